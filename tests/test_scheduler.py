"""The Scheduler on its own: leases, queueing, eviction, keep-alive and reloads, with a fake
runner and a fake clock (no llama-server), so each test takes milliseconds. The same rules with
the real engine are tested through the API in test_inference.py and test_serve.py."""
import threading
import time
import types

import pytest

import ollama


class FakeRunner:
    """What the Scheduler needs of a runner: start, stop, alive, parallel (and num_ctx for ps)."""

    def __init__(self, model, opts, embedding, parallel):
        self.model, self.opts, self.embedding, self.parallel = model, opts, embedding, parallel
        self.num_ctx = opts.get("num_ctx") or 4096
        self.started = False
        self.stopped = threading.Event()
        self.dead = False

    def start(self, timeout):
        self.started = True

    def stop(self):
        self.stopped.set()

    def alive(self):
        return self.started and not self.dead and not self.stopped.is_set()


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def model(name, blob=None, adapters=()):
    """The parts of a Model the Scheduler reads: weights in a blob of their own unless `blob` names one
    that another name shares (a `cp`, or a create that adds only a SYSTEM)."""
    return types.SimpleNamespace(name=ollama.Name.parse(name), digest="sha256:" + name.encode().hex(),
                                 short_name=name + ":latest", model_path="/blobs/" + (blob or name),
                                 projector_paths=[], adapter_paths=list(adapters), draft_path=None)


@pytest.fixture
def make(ollama_home):
    """make(**env) -> a Scheduler with fake runners (its `.runners` lists them in load order)."""
    made = []

    def factory(parallel=1, **env):
        environ = {"HOME": str(ollama_home)}
        environ.update({"OLLAMA_" + k.upper(): str(v) for k, v in env.items()})
        runners = []

        def new_runner(m, opts, embedding):
            runners.append(FakeRunner(m, opts, embedding, parallel))
            return runners[-1]

        sched = ollama.Scheduler(ollama.Config(environ), new_runner=new_runner, clock=Clock(), reaper=False)
        sched.runners = runners
        made.append(sched)
        return sched

    yield factory
    for sched in made:
        sched.shutdown()


def stopped(runner, timeout=2.0):
    """True once the scheduler has stopped `runner` (it stops them on a thread of their own)."""
    return runner.stopped.wait(timeout)


def wait_for(predicate, timeout=2.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def in_thread(func):
    """Run func() on a thread; returns (thread, box) where box gets "result" or "error"."""
    box = {}

    def run():
        try:
            box["result"] = func()
        except Exception as e:  # handed to the test through the box
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def test_second_lease_of_a_model_shares_its_loaded_runner(make):
    sched = make()
    with sched.lease(model("a"), {}, 300) as first:
        pass
    with sched.lease(model("a"), {}, 300) as second:
        assert second.runner is first.runner
    assert len(sched.runners) == 1
    assert [e.model.short_name for e in sched.running()] == ["a:latest"]


def test_lease_is_released_when_its_block_raises(make):
    sched = make()
    with pytest.raises(RuntimeError):
        with sched.lease(model("a"), {}, 300) as lease:
            raise RuntimeError("handler failed")
    assert lease.entry.refs == 0
    assert lease.entry.expires == sched.clock() + 300


def test_streamed_lease_is_released_when_the_stream_ends_not_when_the_block_does(make):
    sched = make()
    with sched.lease(model("a"), {}, 300) as lease:
        items = lease.stream(iter([1, 2]))
    assert lease.entry.refs == 1
    assert list(items) == [1, 2]
    assert lease.entry.refs == 0


def test_streamed_lease_is_released_when_the_stream_is_closed_unstarted(make):
    sched = make()
    with sched.lease(model("a"), {}, 300) as lease:
        items = lease.stream(x for x in [1, 2])
    items.close()
    items.close()                                   # once only: a second close releases nothing
    assert lease.entry.refs == 0


def test_full_table_evicts_the_idle_model_that_expires_soonest(make):
    sched = make(max_loaded_models=2)
    with sched.lease(model("a"), {}, 10):
        pass
    with sched.lease(model("b"), {}, 100):
        pass
    a, b = sched.runners
    with sched.lease(model("c"), {}, 300):
        assert stopped(a)
        assert not b.stopped.is_set()
        assert sorted(e.model.short_name for e in sched.running()) == ["b:latest", "c:latest"]


def test_busy_model_is_not_evicted_the_new_one_waits_for_it(make):
    sched = make(max_loaded_models=1)
    held = sched.lease(model("a"), {}, 300)
    t, box = in_thread(lambda: sched.lease(model("b"), {}, 300))
    time.sleep(0.05)
    assert "result" not in box and len(sched.runners) == 1
    held.release()
    t.join(2)
    assert stopped(sched.runners[0])
    assert box["result"].runner is sched.runners[1]
    box["result"].release()


def test_requests_beyond_max_queue_get_503_busy(make):
    sched = make(max_queue=1)
    held = sched.lease(model("a"), {}, 300)         # the runner's one slot
    t, box = in_thread(lambda: sched.lease(model("a"), {}, 300))
    wait_for(lambda: sched.waiting == 1)
    with pytest.raises(ollama.Busy) as e:
        sched.lease(model("a"), {}, 300)
    assert e.value.status == 503
    assert "maximum pending requests exceeded" in str(e.value)
    held.release()                                  # the queued one gets the slot
    t.join(2)
    assert box["result"].runner is held.runner
    box["result"].release()


def test_parallel_slots_serve_that_many_at_once_then_queue(make):
    sched = make(parallel=2)
    first, second = sched.lease(model("a"), {}, 300), sched.lease(model("a"), {}, 300)
    assert first.runner is second.runner
    t, box = in_thread(lambda: sched.lease(model("a"), {}, 300))
    time.sleep(0.05)
    assert "result" not in box
    first.release()
    t.join(2)
    assert box["result"].runner is first.runner
    second.release()
    box["result"].release()


def test_idle_runner_is_unloaded_when_its_keep_alive_is_over(make):
    sched = make()
    with sched.lease(model("a"), {}, 10):
        pass
    sched.clock.now += 9.9
    sched.reap()
    assert sched.running() and not sched.runners[0].stopped.is_set()
    sched.clock.now += 0.2
    sched.reap()
    assert sched.running() == []
    assert stopped(sched.runners[0])


def test_keep_alive_zero_unloads_at_release_and_forever_never_expires(make):
    sched = make()
    with sched.lease(model("a"), {}, 0):
        pass
    assert stopped(sched.runners[0])
    with sched.lease(model("b"), {}, ollama.FOREVER):
        pass
    sched.clock.now += 10 ** 9
    sched.reap()
    assert [e.model.short_name for e in sched.running()] == ["b:latest"]


def test_keep_alive_timer_starts_when_the_last_request_ends(make):
    sched = make(parallel=2)
    first = sched.lease(model("a"), {}, 10)
    second = sched.lease(model("a"), {}, 10)
    first.release()
    sched.clock.now += 60                           # still in use: no deadline yet
    sched.reap()
    assert sched.running()
    second.release()
    sched.clock.now += 5
    sched.reap()
    assert sched.running()
    sched.clock.now += 6
    sched.reap()
    assert sched.running() == []


def test_changed_load_option_reloads_the_model(make):
    sched = make()
    with sched.lease(model("a"), {"num_ctx": 2048}, 300) as old:
        pass
    with sched.lease(model("a"), {"num_ctx": 2048, "temperature": 0.1}, 300) as same:
        assert same.runner is old.runner             # a sampling option needs no reload
    with sched.lease(model("a"), {"num_ctx": 4096}, 300) as new:
        assert new.runner is not old.runner and new.runner.num_ctx == 4096
    assert stopped(old.runner)
    assert len(sched.running()) == 1


def test_an_embedding_runner_loads_beside_the_completion_one_and_stop_ends_both(make):
    """llama-server embeds or completes, not both: a model used for chat and for embeddings keeps a
    runner for each instead of reloading at every switch."""
    sched = make()
    assert sched.loaded_embedding(ollama.Name.parse("a")) is None
    with sched.lease(model("b", blob="a"), {}, 300, embedding=True):
        pass
    assert sched.loaded_embedding(ollama.Name.parse("b")) is True
    with sched.lease(model("a"), {}, 300) as chat:
        assert not chat.runner.embedding
    with sched.lease(model("a"), {}, 300, embedding=True) as lease:
        assert lease.runner.embedding and lease.runner is sched.runners[0]
    assert sched.loaded_embedding(ollama.Name.parse("a")) is False     # a completion runner is loaded
    assert len(sched.runners) == 2 and not any(r.stopped.is_set() for r in sched.runners)
    assert sched.expire("a")
    assert all(stopped(r) for r in sched.runners)


def test_dead_runner_is_replaced_by_the_next_lease(make):
    sched = make()
    with sched.lease(model("a"), {}, 300) as old:
        pass
    old.runner.dead = True
    with sched.lease(model("a"), {}, 300) as new:
        assert new.runner is not old.runner and new.runner.alive()
    assert len(sched.runners) == 2


def test_idle_dead_runner_is_reaped(make):
    sched = make()
    with sched.lease(model("a"), {}, 300) as lease:
        pass
    lease.runner.dead = True
    sched.reap()
    assert sched.running() == []


def test_shutdown_stops_every_runner_and_refuses_new_leases(make):
    sched = make()
    with sched.lease(model("a"), {}, 300):
        pass
    held = sched.lease(model("b"), {}, 300)
    sched.shutdown()
    assert all(r.stopped.is_set() for r in sched.runners)
    assert sched.running() == []
    with pytest.raises(ollama.OllamaError, match="shutting down"):
        sched.lease(model("c"), {}, 300)
    held.release()


def test_a_second_shutdown_is_harmless(make):
    sched = make()
    errors = []
    hook, threading.excepthook = threading.excepthook, errors.append
    try:
        sched.shutdown()
        sched.shutdown()                            # as the fixture does after a test that shut it down
        time.sleep(0.05)
    finally:
        threading.excepthook = hook
    assert errors == []


def test_two_names_for_one_blob_share_one_runner_and_both_are_listed(make):
    sched = make()
    with sched.lease(model("a", blob="w"), {}, 300) as first:
        pass
    with sched.lease(model("b", blob="w"), {"temperature": 0.5}, 300) as second:
        assert second.runner is first.runner         # the SYSTEM/sampling of b is applied per request
    assert len(sched.runners) == 1
    (entry,) = sched.running()
    assert [m.short_name for m in entry.models.values()] == ["a:latest", "b:latest"]
    assert sched.runners_for(ollama.Name.parse("b")) == [entry]


def test_stopping_one_name_of_a_shared_blob_stops_the_runner_for_both(make):
    sched = make()
    with sched.lease(model("a", blob="w"), {}, 300):
        pass
    with sched.lease(model("b", blob="w"), {}, 300):
        pass
    assert sched.expire("b")
    assert stopped(sched.runners[0])
    assert sched.running() == [] and sched.runners_for(ollama.Name.parse("a")) == []


def test_a_shared_blob_counts_once_against_max_loaded_models(make):
    sched = make(max_loaded_models=2)
    for name in ("a", "b"):
        with sched.lease(model(name, blob="w"), {}, 300):
            pass
    with sched.lease(model("c"), {}, 300):
        pass
    assert len(sched.runners) == 2 and not any(r.stopped.is_set() for r in sched.runners)


def test_a_name_whose_engine_options_differ_reloads_the_shared_runner(make):
    sched = make()
    with sched.lease(model("a", blob="w"), {}, 300) as plain:
        pass
    with sched.lease(model("tuned", blob="w", adapters=["/blobs/lora"]), {}, 300) as tuned:
        assert tuned.runner is not plain.runner
    assert stopped(plain.runner)
    assert [e.model.short_name for e in sched.running()] == ["tuned:latest"]


def test_speculative_option_and_server_setting_become_the_spec_type_flag():
    assert ollama.ngram_args({}, "") == []
    assert ollama.ngram_args({}, "ngram-simple") == ["--spec-type", "ngram-simple"]
    assert ollama.ngram_args({"speculative": True}, "") == ["--spec-type", "ngram-mod"]
    assert ollama.ngram_args({"speculative": True}, "ngram-simple") == ["--spec-type", "ngram-simple"]
    assert ollama.ngram_args({"speculative": False}, "ngram-mod") == []


@pytest.mark.parametrize("value, kind", [("", ""), ("on", "ngram-mod"), ("0", ""),
                                         ("off", ""), ("NGRAM-SIMPLE", "ngram-simple"),
                                         ("bogus", ollama.DEFAULT_SPECULATIVE)])
def test_ollama_speculative_is_read_once_into_config(value, kind):
    assert ollama.Config({"HOME": "/nonexistent", "OLLAMA_SPECULATIVE": value}).speculative == kind


@pytest.mark.parametrize("value, repack", [("", None), ("1", True), ("true", True), ("0", False),
                                           ("false", False)])
def test_ollama_repack_is_read_once_into_config(value, repack):
    assert ollama.Config({"HOME": "/nonexistent", "OLLAMA_REPACK": value}).repack is repack


@pytest.mark.parametrize("repack, workers, repacks", [("", "", True), ("", "10.0.0.2:50052", False),
                                                      ("1", "10.0.0.2:50052", True), ("0", "", False)])
def test_runners_repack_weights_unless_the_serve_has_rpc_workers_or_says(repack, workers, repacks):
    config = ollama.Config({"HOME": "/nonexistent", "OLLAMA_REPACK": repack, "OLLAMA_RPC_SERVERS": workers})
    assert ollama.runner_repacks(config) is repacks
    args = ollama.Runner("llama-server", "m.gguf", repack=ollama.runner_repacks(config)).args
    assert ("--no-repack" in args) is not repacks


def test_a_changed_speculative_option_reloads_the_runner(make):
    sched = make()
    with sched.lease(model("a"), {"speculative": False}, 300) as off:
        pass
    with sched.lease(model("a"), {"speculative": True}, 300) as on:
        assert on.runner is not off.runner


def test_a_streamed_request_waiting_for_the_slot_goes_before_a_background_one_that_came_first(make):
    sched = make()
    held = sched.lease(model("a"), {}, 300)
    title, title_box = in_thread(lambda: sched.lease(model("a"), {}, 300))
    wait_for(lambda: sched.waiting == 1)
    chat, chat_box = in_thread(lambda: sched.lease(model("a"), {}, 300, interactive=True))
    wait_for(lambda: sched.waiting == 2)
    held.release()
    chat.join(2)
    assert "result" in chat_box and "result" not in title_box     # the title still waits
    chat_box["result"].release()
    title.join(2)
    assert "result" in title_box
    title_box["result"].release()


def test_a_runner_loaded_by_a_background_request_serves_the_streamed_one_waiting_for_it_first(make):
    sched = make()
    loading, go = threading.Event(), threading.Event()
    fake = sched.new_runner

    def slow_runner(m, opts, embedding):
        r = fake(m, opts, embedding)
        r.start = lambda timeout: (loading.set(), go.wait(2), setattr(r, "started", True))
        return r

    sched.new_runner = slow_runner
    title, title_box = in_thread(lambda: sched.lease(model("a"), {}, 300))
    loading.wait(2)
    chat, chat_box = in_thread(lambda: sched.lease(model("a"), {}, 300, interactive=True))
    wait_for(lambda: sched.waiting == 2)
    go.set()
    chat.join(2)
    assert "result" in chat_box and "result" not in title_box
    assert len(sched.runners) == 1
    chat_box["result"].release()
    title.join(2)
    assert title_box["result"].runner is sched.runners[0]
    title_box["result"].release()


def test_a_streamed_request_does_not_hold_back_one_for_another_model(make):
    sched = make(max_loaded_models=2)
    held = sched.lease(model("a"), {}, 300)
    chat, chat_box = in_thread(lambda: sched.lease(model("a"), {}, 300, interactive=True))
    wait_for(lambda: sched.waiting == 1)
    with sched.lease(model("b"), {}, 300) as other:
        assert other.runner is not held.runner
    held.release()
    chat.join(2)
    chat_box["result"].release()


def hold_saves(sched):
    """Make the scheduler's prompt-cache saves wait: (saving, set when one starts; go, set to let it
    finish (2 s at most); saved, the runners saved)."""
    saving, go, saved = threading.Event(), threading.Event(), []

    def slow_save(runner):
        saving.set()
        go.wait(2)
        saved.append(runner)
        return []

    sched.prompt_cache.save = slow_save
    return saving, go, saved


def test_the_next_runner_for_a_blob_starts_after_the_last_one_has_saved_and_stopped(make):
    sched = make()
    saving, go, saved = hold_saves(sched)
    sched.lease(model("a"), {}, 0).release()                # keep_alive 0: unloaded, saved on a thread
    saving.wait(2)
    t, box = in_thread(lambda: sched.lease(model("a"), {}, 300))
    time.sleep(0.1)
    assert "result" not in box and len(sched.runners) == 1  # waits for the save it would restore
    go.set()
    t.join(2)
    assert saved == [sched.runners[0]] and box["result"].runner is sched.runners[1]
    box["result"].release()


def test_a_streamed_request_asks_for_its_runner_as_interactive_and_a_title_task_does_not(monkeypatch):
    seen = []
    sched = types.SimpleNamespace(lease=lambda *a, **kw: seen.append(kw["interactive"]))
    req = types.SimpleNamespace(server=types.SimpleNamespace(scheduler=sched))
    monkeypatch.setattr(ollama, "_request_options", lambda model, body: {})
    for body in ({}, {"stream": True}, {"stream": False}):       # Ollama's API streams unless told not to
        ollama._schedule(req, None, body, 300)
    ollama._schedule(req, None, {}, 300, embedding=True)
    assert seen == [True, True, False, False]


def _recording_saves(sched):
    saved = []
    sched.prompt_cache.save = lambda runner: saved.append(runner) or []
    return saved


def test_idle_runners_are_saved_at_shutdown_and_a_busy_one_is_not(make):
    sched = make(max_loaded_models=2)
    saved = _recording_saves(sched)
    sched.lease(model("a"), {}, 300).release()
    busy = sched.lease(model("b"), {}, 300)
    sched.shutdown()
    assert saved == [sched.runners[0]] and all(r.stopped.is_set() for r in sched.runners)
    busy.release()


def test_an_evicted_runner_is_saved_before_it_stops(make):
    sched = make(max_loaded_models=1)
    saved = _recording_saves(sched)
    sched.lease(model("a"), {}, 300).release()
    with sched.lease(model("b"), {}, 300):
        assert stopped(sched.runners[0]) and saved == [sched.runners[0]]


def test_a_stop_asked_during_a_request_unloads_when_it_ends_despite_its_own_keep_alive(make):
    sched = make()
    lease = sched.lease(model("a"), {}, 300)
    assert sched.expire("a")
    lease.release()                                   # its keep_alive (300 s) must not undo the stop
    assert stopped(sched.runners[0]) and sched.running() == []


def test_a_model_loaded_in_an_evicted_ones_place_waits_until_that_one_is_saved_and_stopped(make):
    sched = make(max_loaded_models=1)
    saving, go, _saved = hold_saves(sched)
    sched.lease(model("a"), {}, 300).release()
    t, box = in_thread(lambda: sched.lease(model("b"), {}, 300))   # evicts a, which is saved on a thread
    saving.wait(2)
    time.sleep(0.1)
    assert len(sched.runners) == 1                  # on a Pi the two would not fit in memory together
    go.set()
    t.join(2)
    assert sched.runners[0].stopped.is_set() and box["result"].runner is sched.runners[1]
    box["result"].release()


def test_shutdown_waits_for_an_unload_under_way_to_save_and_stop(make):
    sched = make()
    saving, go, _saved = hold_saves(sched)
    sched.lease(model("a"), {}, 0).release()        # keep_alive 0: saved and stopped on a thread
    saving.wait(2)
    t, _ = in_thread(sched.shutdown)
    time.sleep(0.1)
    assert t.is_alive() and not sched.runners[0].stopped.is_set()
    go.set()
    t.join(2)
    assert sched.runners[0].stopped.is_set()
