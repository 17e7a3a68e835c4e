"""``python -m llamacpp_ha.sim --port P --slots N --model NAME``: serve a simulated llama-server
(``--router qwen,gemma``: one in router mode)."""

from __future__ import annotations

import argparse
import math
import sys

from ._app import SimulatedLlamaServer
from ._config import PROFILES, SimConfig
from ._http import http_protocol
from ._router import SimulatedLlamaRouter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llamacpp_ha.sim", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--profile", choices=sorted(PROFILES), help="calibrated speeds (shared/calibration.md)")
    parser.add_argument("--slots", type=int, help="parallel slots (llama-server -np)")
    parser.add_argument("--model", help="model file name reported by /v1/models")
    parser.add_argument("--alias", help="comma-separated aliases; the first becomes the model id")
    parser.add_argument("--n-ctx", type=int, help="context per slot, in tokens")
    parser.add_argument("--prefill-tps", type=float, help="prompt tokens per second")
    parser.add_argument("--decode-tps", type=float, help="generated tokens per second for one stream")
    parser.add_argument("--instant", action="store_true", help="answer without simulated compute time")
    parser.add_argument("--loading-s", type=float, help="answer 503 Loading model for this long")
    parser.add_argument("--api-key", help="require this key (Bearer or X-Api-Key)")
    parser.add_argument("--no-slots", action="store_true", help="disable /slots (501), like --no-slots")
    parser.add_argument("--cache-ram", type=int, metavar="MIB", help="RAM prompt cache, MiB (0: off)")
    parser.add_argument(
        "--no-cache-idle-slots", action="store_true", help="do not save idle slots to the RAM cache as tasks start"
    )
    parser.add_argument("--config-json", help="a whole SimConfig as JSON (used by SimProcess)")
    parser.add_argument(
        "--router", metavar="MODELS", help="router mode (--models-dir): comma-separated model ids, loaded on demand"
    )
    parser.add_argument("--models-max", type=int, default=4, help="router mode: models loaded at once")
    parser.add_argument("--load-s", type=float, default=2.0, help="router mode: seconds to load a model")
    args = parser.parse_args(argv)

    if args.config_json:
        config = SimConfig.model_validate_json(args.config_json)
    else:
        config = SimConfig.profile(args.profile) if args.profile else SimConfig()
    updates = {
        "slots": args.slots,
        "model": args.model,
        "aliases": tuple(args.alias.split(",")) if args.alias else None,
        "n_ctx": args.n_ctx,
        "prefill_tokens_per_s": math.inf if args.instant else args.prefill_tps,
        "decode_tokens_per_s": math.inf if args.instant else args.decode_tps,
        "loading_s": args.loading_s,
        "api_key": args.api_key,
        "slots_endpoint": False if args.no_slots else None,
        "cache_ram_mib": args.cache_ram,
        "cache_idle_slots": False if args.no_cache_idle_slots else None,
    }
    config = SimConfig.model_validate(config.model_dump() | {k: v for k, v in updates.items() if v is not None})

    import uvicorn

    app: SimulatedLlamaServer | SimulatedLlamaRouter
    if args.router:
        names = [name for name in args.router.split(",") if name]
        app = SimulatedLlamaRouter(dict.fromkeys(names, config), models_max=args.models_max, load_s=args.load_s)
        print(
            f"simulated llama-server router ({', '.join(names)}; {config.slots} slots each) on http://{args.host}:{args.port}"
        )
    else:
        app = SimulatedLlamaServer(config)
        print(f"simulated llama-server {config.model_id} ({config.slots} slots) on http://{args.host}:{args.port}")
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        lifespan="off",
        log_level="warning",
        server_header=False,
        date_header=False,
        access_log=False,
        http=http_protocol(config.close_after_stream),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
