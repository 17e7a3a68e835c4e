from __future__ import annotations

from llamacpp_ha import BackendConfig, BackendState
from llamacpp_ha._backend import Backend


def healthy(reported_slots: int = 4, **config: object) -> Backend:
    backend = Backend(BackendConfig(url="http://a:1", **config))  # type: ignore[arg-type]
    backend.reported_capacity = reported_slots
    backend.set_state(BackendState.HEALTHY, "ready")
    return backend


def test_free_slots_count_ours_and_others() -> None:
    backend = healthy(4)
    backend.in_flight = 1
    backend.begin_poll()
    backend.reconcile(observed_busy=3)
    assert backend.external == 2
    assert backend.free_slots == 1


def test_reconcile_never_goes_negative_when_our_request_is_not_busy_yet() -> None:
    backend = healthy(4)
    backend.in_flight = 2  # sent, but the backend has not started them when polled
    backend.begin_poll()
    backend.reconcile(observed_busy=0)
    assert backend.external == 0
    assert backend.free_slots == 2


def test_reconcile_does_not_count_a_lease_released_during_the_poll_twice() -> None:
    backend = healthy(2)
    backend.in_flight = 1
    backend.begin_poll()
    backend.in_flight = 0  # released while the poll was on the wire; the backend still showed it busy
    backend.reconcile(observed_busy=1)
    assert backend.external == 0


def test_reconcile_does_not_count_a_lease_that_came_and_went_during_the_poll() -> None:
    # Granted and released while /slots was on the wire: neither count at sending nor now sees it.
    backend = healthy(2)
    backend.begin_poll()
    backend.in_flight = 1
    backend.in_flight = 0
    backend.reconcile(observed_busy=1)
    assert backend.external == 0


def test_a_slot_still_busy_after_we_let_go_counts_as_busy() -> None:
    # llama-server may keep running a request whose client left (non-stream cancellation).
    backend = healthy(2)
    backend.begin_poll()
    backend.reconcile(observed_busy=1)
    assert backend.free_slots == 1


def test_capacity_override_and_unroutable_states() -> None:
    backend = healthy(4, capacity=1)
    assert backend.free_slots == 1
    backend.set_state(BackendState.LOADING, "loading")
    assert backend.free_slots == 0
    backend.set_state(BackendState.DEAD, "refused")
    assert not backend.routable


def test_model_names_match_ids_aliases_and_stems() -> None:
    backend = healthy()
    backend.set_models(("tiny-random-llama.gguf", "other"), ("tiny-alias", "tiny-chat"))
    for name in ("tiny-random-llama.gguf", "tiny-random-llama", "other", "tiny-alias", "tiny-chat", None):
        assert backend.serves(name), name
    assert not backend.serves("tiny")


def test_configured_models_win_over_reported_ones() -> None:
    backend = healthy(models=("pinned",))
    backend.set_models(("reported",))
    assert backend.serves("pinned")
    assert not backend.serves("reported")


def test_a_model_id_that_is_a_path_answers_to_its_file_name() -> None:
    # llama-server reports -m as given: started with a full path, the path is the model id.
    backend = healthy()
    backend.set_models(("/srv/models/Qwen2.5-7B-Instruct-Q4_K_M.gguf",))
    for name in (
        "Qwen2.5-7B-Instruct-Q4_K_M",
        "Qwen2.5-7B-Instruct-Q4_K_M.gguf",
        "/srv/models/Qwen2.5-7B-Instruct-Q4_K_M.gguf",
    ):
        assert backend.serves(name), name
    assert not backend.serves("Qwen2.5-7B")
