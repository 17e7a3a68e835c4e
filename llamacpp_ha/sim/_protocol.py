"""JSON shapes of llama-server b11312 responses, as captured in the fixtures."""

from __future__ import annotations

import json
import secrets
import string
import time
from typing import Any

from ._config import SimConfig
from ._slots import SimSlot

__all__ = [
    "DEFAULT_PARAMS",
    "dumps",
    "error_body",
    "generation_settings",
    "metrics_text",
    "models_body",
    "new_completion_id",
    "props_body",
    "slots_body",
    "timings",
    "unix_now",
]

DEFAULT_PARAMS: dict[str, Any] = {
    "seed": 4294967295,
    "temperature": 0.800000011920929,
    "dynatemp_range": 0.0,
    "dynatemp_exponent": 1.0,
    "top_k": 40,
    "top_p": 0.949999988079071,
    "min_p": 0.05000000074505806,
    "top_n_sigma": -1.0,
    "xtc_probability": 0.0,
    "xtc_threshold": 0.10000000149011612,
    "typical_p": 1.0,
    "repeat_last_n": 64,
    "repeat_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "dry_multiplier": 0.0,
    "dry_base": 1.75,
    "dry_allowed_length": 2,
    "dry_penalty_last_n": 64,
    "mirostat": 0,
    "mirostat_tau": 5.0,
    "mirostat_eta": 0.10000000149011612,
    "adaptive_target": -1.0,
    "adaptive_decay": 0.8999999761581421,
    "max_tokens": -1,
    "n_predict": -1,
    "n_keep": 0,
    "n_discard": 0,
    "ignore_eos": False,
    "stream": False,
    "n_probs": 0,
    "min_keep": 0,
    "chat_format": "Content-only",
    "reasoning_format": "none",
    "reasoning_in_content": False,
    "generation_prompt": "",
    "samplers": ["penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature"],
    "speculative.types": "none",
    "timings_per_token": False,
    "post_sampling_probs": False,
    "backend_sampling": False,
    "lora": [],
}

# A native completion's generation_settings: the params plus sampling fields /props omits.
_SETTINGS_EXTRA_AFTER: dict[str, dict[str, Any]] = {
    "dry_penalty_last_n": {"dry_sequence_breakers": ["\n", ":", '"', "*"]},
    "adaptive_decay": {"stop": []},
    "stream": {"logit_bias": []},
    "min_keep": {"grammar": "", "grammar_lazy": False, "grammar_triggers": [], "preserved_tokens": []},
}


def generation_settings(params: dict[str, Any]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for key, value in {**DEFAULT_PARAMS, **params}.items():
        settings[key] = value
        settings |= _SETTINGS_EXTRA_AFTER.get(key, {})
    return settings


_CHAT_TEMPLATE = (
    "{%- for message in messages -%}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' -}}{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)
_ID_ALPHABET = string.ascii_letters + string.digits


def dumps(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def error_body(code: int, message: str, error_type: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "type": error_type, **extra}}


def new_completion_id() -> str:
    return "chatcmpl-" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(32))


def timings(cache_n: int, prompt_n: int, prompt_ms: float, predicted_n: int, predicted_ms: float) -> dict[str, Any]:
    prompt_ms = max(prompt_ms, 1e-3)
    predicted_ms = max(predicted_ms, 1e-3)
    return {
        "cache_n": cache_n,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / max(prompt_n, 1),
        "prompt_per_second": 1000.0 * prompt_n / prompt_ms,
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / max(predicted_n, 1),
        "predicted_per_second": 1000.0 * predicted_n / predicted_ms,
    }


def props_body(config: SimConfig) -> dict[str, Any]:
    return {
        "default_generation_settings": {"params": DEFAULT_PARAMS, "n_ctx": config.n_ctx},
        "total_slots": config.slots,
        "model_alias": config.model_id,
        "model_ftype": "F16",
        "model_path": config.model,
        "modalities": {"vision": False, "video": False, "audio": False},
        "media_marker": "<__media_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(32)) + "__>",
        "endpoint_slots": config.slots_endpoint,
        "endpoint_props": False,
        "endpoint_metrics": config.metrics,
        "ui": True,
        "ui_settings": {},
        "chat_template": _CHAT_TEMPLATE,
        "chat_template_caps": {
            "supports_object_arguments": False,
            "supports_parallel_tool_calls": False,
            "supports_preserve_reasoning": False,
            "supports_reasoning_effort": False,
            "supports_string_content": True,
            "supports_system_role": True,
            "supports_tool_calls": False,
            "supports_tools": False,
            "supports_typed_content": False,
        },
        "bos_token": "<s>",
        "eos_token": "</s>",
        "build_info": config.build_info,
        "is_sleeping": False,
        "cors_proxy_enabled": False,
    }


def models_body(config: SimConfig, created: int) -> dict[str, Any]:
    model_id = config.model_id
    aliases = list(config.aliases) or [config.model]
    details = {
        "parent_model": "",
        "format": "gguf",
        "family": "",
        "families": [""],
        "parameter_size": "",
        "quantization_level": "",
    }
    ollama = {
        "name": model_id,
        "model": model_id,
        "modified_at": "",
        "size": "",
        "digest": "",
        "type": "model",
        "description": "",
        "tags": [""],
        "capabilities": ["completion"],
        "parameters": "",
        "details": details,
    }
    meta = {
        "vocab_type": 1,
        "n_vocab": 32000,
        "n_ctx": config.n_ctx,
        "n_ctx_train": 2048,
        "n_embd": 64,
        "n_params": 2146624,
        "size": 4293888,
        "ftype": "F16",
    }
    data = {
        "id": model_id,
        "aliases": aliases,
        "tags": [],
        "object": "model",
        "created": created,
        "owned_by": "llamacpp",
        "meta": meta,
    }
    return {"models": [ollama], "object": "list", "data": [data]}


def slots_body(slots: list[SimSlot]) -> list[dict[str, Any]]:
    body = []
    for slot in slots:
        entry: dict[str, Any] = {
            "id": slot.id,
            "n_ctx": slot.n_ctx,
            "speculative": False,
            "is_processing": slot.is_processing,
        }
        if slot.id_task is not None:
            # Idle slots keep the fields of their last task: only is_processing means busy.
            entry |= {
                "id_task": slot.id_task,
                "n_prompt_tokens": len(slot.tokens),
                "n_prompt_tokens_processed": slot.n_prompt_tokens_processed,
                "n_prompt_tokens_cache": slot.n_prompt_tokens_cache,
                "params": {**DEFAULT_PARAMS, **slot.params},
                "next_token": [
                    {
                        "has_next_token": slot.is_processing,
                        "has_new_line": False,
                        "n_remain": slot.n_remain,
                        "n_decoded": slot.n_decoded,
                    }
                ],
            }
        body.append(entry)
    return body


_METRICS = (
    ("prompt_tokens_total", "counter", "Number of prompt tokens processed, excluding cached tokens"),
    ("prompt_tokens_cached_total", "counter", "Number of prompt tokens reused from the cache"),
    ("prompt_seconds_total", "counter", "Total time spent processing prompts"),
    ("tokens_predicted_total", "counter", "Number of generation tokens processed"),
    ("tokens_predicted_seconds_total", "counter", "Total time spent generating tokens"),
    (
        "n_decode_total",
        "counter",
        "Total number of llama_decode() calls, excluding speculative decoding and multimodal decoding",
    ),
    ("n_tokens_max", "counter", "Largest observed sequence length (prompt + generation)"),
    ("spec_decode_num_draft_tokens_total", "counter", "Speculative: Total draft tokens generated"),
    (
        "spec_decode_num_accepted_tokens_total",
        "counter",
        "Speculative: Total draft tokens accepted by the target model",
    ),
    ("spec_decode_num_drafts_total", "counter", "Speculative: Total speculative decoding verification steps"),
    ("prompt_tokens_seconds", "gauge", "Average prompt throughput in tokens/s"),
    ("predicted_tokens_seconds", "gauge", "Average generation throughput in tokens/s"),
    ("requests_processing", "gauge", "Number of requests processing"),
    ("requests_deferred", "gauge", "Number of requests deferred"),
    ("n_busy_slots_per_decode", "gauge", "Average number of busy slots per llama_decode() call"),
)


def metrics_text(values: dict[str, float]) -> str:
    lines = []
    for name, kind, help_text in _METRICS:
        value = values.get(name, 0)
        shown = int(value) if float(value).is_integer() else value
        lines += [
            f"# HELP llamacpp:{name} {help_text}",
            f"# TYPE llamacpp:{name} {kind}",
            f"llamacpp:{name} {shown}",
        ]
    return "\n".join(lines) + "\n"


def unix_now() -> int:
    return int(time.time())
