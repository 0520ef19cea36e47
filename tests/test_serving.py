"""The continuous-batching scheduler without HTTP, on tiny models: requests that join and leave a running batch
get exactly what they get alone, prefill runs in bounded chunks between decoding steps, cancellation frees the
slot, and sizes are checked."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from helpers import prompt_ids, tiny_model, word_tokenizer

import lazyprefill as lp
from lazyprefill.engine import DecodeOptions
from lazyprefill.generation import SamplingParams
from lazyprefill.serving import Event, Refused, Scheduler, ServeConfig, ServeRequest, slot_bytes

TOKENIZER = word_tokenizer()


class Collector:
    """The events of one request, and a way to wait for its end."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.times: list[float] = []  # perf_counter() of each event
        self.done = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        self.times.append(time.perf_counter())
        if event.finish_reason is not None:
            self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [e.token for e in self.events if e.token is not None]

    @property
    def finish(self) -> str | None:
        return self.events[-1].finish_reason if self.done.is_set() else None


def request(prompt: torch.Tensor, new: int, schedule: str = "", sampling: SamplingParams = SamplingParams(),
            stop: tuple[str, ...] = ()) -> tuple[ServeRequest, Collector]:
    out = Collector()
    return ServeRequest(prompt.tolist(), new, sampling, schedule, stop, out), out


def wait(collectors: list[Collector], timeout: float = 60.0) -> None:
    for c in collectors:
        assert c.done.wait(timeout), "a request did not finish"


@pytest.fixture(params=[("paper", None), ("dense", None), ("balanced", True)],
                ids=["paper", "dense", "balanced-graph-layout"])
def scheduled(request):
    """A scheduler of three slots; the last runs the GPU's decoding layout eagerly (DecodeOptions.graph_layout):
    every slot a step, bucketed rows, the revival bound laid out."""
    schedule, layout = request.param
    model = tiny_model("llama_gqa_rope3")
    config = ServeConfig(schedule=schedule, max_batch=3, max_prompt_tokens=120, max_new_tokens=16,
                         prefill_chunk=64)
    scheduler = Scheduler(model, TOKENIZER, config, decode=DecodeOptions(graph_layout=layout), eos=set())
    yield model, scheduler, schedule
    scheduler.close()


def test_requests_joining_and_leaving_get_what_they_get_alone(scheduled):
    """Five requests of different lengths on three slots, arriving while others decode (some wait for a slot),
    with prefill in chunks of 64 rows x layers between decoding steps: each gets the greedy tokens of
    LazyLLM.generate on its prompt alone."""
    model, scheduler, schedule = scheduled
    running: list[float] = []
    scheduler.observe = lambda name, value: running.append(value) if name == "running" else None
    prompts = [prompt_ids(n, seed=n) for n in (90, 17, 60, 33, 110)]
    news = [16, 5, 12, 16, 9]
    outs = []
    for i, (prompt, new) in enumerate(zip(prompts, news)):
        if i == 3:  # the last two arrive while the first ones decode (and wait for a slot)
            while not outs[0].tokens:
                time.sleep(0.001)
        r, out = request(prompt, new)
        scheduler.submit(r)
        outs.append(out)
    wait(outs)
    lazy = lp.LazyLLM(model, schedule)
    for prompt, new, out in zip(prompts, news, outs):
        want = lazy.generate(prompt, max_new_tokens=new, eos_token_id=[]).new_tokens
        assert out.tokens == want and out.finish == "length"
    assert max(running) == 3  # they overlapped: every slot ran at once
    assert scheduler.stats() == {"waiting": 0, "running": 0}


@pytest.mark.parametrize("chunk, least", [(64, 3), (10**9, 0)])
def test_prefill_runs_in_chunks_between_decoding_steps(chunk, least):
    """A long prompt's prefill is cut into chunks of `prefill_chunk` rows x layers, each followed by a decoding
    step of the running request: with chunks of 64 (a layer of the 110-token prompt each), the running request
    produces tokens between the new one's arrival and its first token; with one chunk for the whole prefill, at
    most one (the step already under way)."""
    model = tiny_model("llama_gqa_rope3")
    config = ServeConfig(schedule="dense", max_batch=2, max_prompt_tokens=120, max_new_tokens=16, prefill_chunk=chunk)
    scheduler = Scheduler(model, TOKENIZER, config, eos=set())
    try:
        first, first_out = request(prompt_ids(20, seed=1), 16)
        scheduler.submit(first)
        while not first_out.tokens:
            time.sleep(0.01)
        long, long_out = request(prompt_ids(110, seed=2), 2)
        scheduler.submit(long)
        wait([first_out, long_out])
    finally:
        scheduler.close()
    first_token_at = long_out.times[0]
    between = [t for t, e in zip(first_out.times, first_out.events) if long.arrived < t < first_token_at and e.token]
    assert len(between) >= least if least else len(between) <= 1


def test_cancelling_frees_the_slot(scheduled):
    """Three slots busy and one request waiting: cancelling a decoding request gives its slot to the waiting one
    before the others finish, and the newcomer gets what it gets alone, whatever the slot held."""
    model, scheduler, schedule = scheduled
    rs = [request(prompt_ids(30, seed=s), 16) for s in range(3)]
    for r, _ in rs:
        scheduler.submit(r)
    while not all(out.tokens for _, out in rs):
        time.sleep(0.01)
    waiting, waiting_out = request(prompt_ids(25, seed=9), 4)
    scheduler.submit(waiting)
    rs[1][0].cancel()
    wait([rs[1][1], waiting_out])
    assert rs[1][1].finish == "cancelled" and len(rs[1][1].tokens) < 16 and waiting_out.finish == "length"
    assert waiting.slot == rs[1][0].slot
    wait([out for _, out in rs])
    assert waiting_out.times[-1] < max(out.times[-1] for _, out in (rs[0], rs[2]))  # it did not wait for them
    want = lp.LazyLLM(model, schedule).generate(prompt_ids(25, seed=9), max_new_tokens=4, eos_token_id=[])
    assert waiting_out.tokens == want.new_tokens
    while scheduler.stats()["running"]:
        time.sleep(0.01)
    assert [sorted(p.free) for p in scheduler.pools.values()] == [[0, 1, 2]]


def test_stop_strings_and_eos_end_a_request():
    """EOS ends a request ("stop") and is not part of its text; a stop string ends it too, and the text is cut
    before it, as OpenAI does."""
    model = tiny_model("llama_gqa_rope3")
    prompt = prompt_ids(30, seed=4)
    free = lp.LazyLLM(model, "paper").generate(prompt, max_new_tokens=12, eos_token_id=[]).new_tokens
    config = ServeConfig(schedule="paper", max_batch=2, max_prompt_tokens=64, max_new_tokens=12)
    full = TOKENIZER.decode(free)
    stop = next(s for k in range(2, 10) if full.index(s := TOKENIZER.decode(free[k : k + 2])) > 0)
    outs = []
    for eos, stops in (({free[5]}, ()), (set(), (stop,))):
        scheduler = Scheduler(model, TOKENIZER, config, eos=eos)
        try:
            r, out = request(prompt, 12, stop=stops)
            scheduler.submit(r)
            wait([out])
        finally:
            scheduler.close()
        outs.append((r, out))
    (_, by_eos), (by_stop, by_stop_out) = outs
    assert by_eos.tokens == free[: free.index(free[5])] and by_eos.finish == "stop"
    assert by_stop_out.finish == "stop" and by_stop.text == full[: full.index(stop)]
    assert "".join(e.text for e in by_stop_out.events) == by_stop.text


def test_a_request_of_another_schedule_gets_its_own_engine():
    model = tiny_model("llama_gqa_rope3")
    scheduler = Scheduler(model, TOKENIZER, ServeConfig(max_batch=2, max_prompt_tokens=64, max_new_tokens=6),
                          eos=set())
    try:
        outs = []
        for schedule in ("", "dense", "paper"):
            r, out = request(prompt_ids(40, seed=7), 6, schedule)
            scheduler.submit(r)
            outs.append((schedule, r, out))
        wait([out for _, _, out in outs])
    finally:
        scheduler.close()
    for schedule, r, out in outs:
        want = lp.LazyLLM(model, schedule or "balanced").generate(prompt_ids(40, seed=7), max_new_tokens=6,
                                                                   eos_token_id=[])
        assert out.tokens == want.new_tokens
        assert (r.prefill_work == 1.0) == (schedule == "dense")


def test_sizes_and_queue_are_checked():
    model = tiny_model("llama_gqa_rope3")
    with pytest.raises(ValueError, match="must fit the model's 256 positions"):
        Scheduler(model, TOKENIZER, ServeConfig(max_prompt_tokens=250, max_new_tokens=16))
    with pytest.raises(ValueError, match="holds no slot"):
        Scheduler(model, TOKENIZER, ServeConfig(max_prompt_tokens=100, max_new_tokens=16, kv_budget_gb=1e-6))
    with pytest.raises(ValueError, match="max_batch must be an int >= 1"):
        ServeConfig(max_batch=0)
    scheduler = Scheduler(model, TOKENIZER, ServeConfig(max_batch=1, max_prompt_tokens=64, max_new_tokens=8,
                                                        max_queue=1), eos=set())
    try:
        with pytest.raises(Refused, match="at most 64") as err:
            scheduler.submit(request(prompt_ids(65), 4)[0])
        assert err.value.code == "context_length_exceeded"
        with pytest.raises(Refused, match="between 1 and 8"):
            scheduler.submit(request(prompt_ids(10), 9)[0])
        with pytest.raises(Refused, match="bad schedule 'nope'"):
            scheduler.submit(request(prompt_ids(10), 4, "nope")[0])
        running, running_out = request(prompt_ids(10), 8)
        scheduler.submit(running)
        while not running_out.tokens:
            time.sleep(0.01)
        scheduler.submit(request(prompt_ids(10), 4)[0])  # waits for the one slot
        with pytest.raises(Refused, match="waiting") as err:
            scheduler.submit(request(prompt_ids(10), 4)[0])
        assert err.value.status == 429
    finally:
        scheduler.close()


def test_kv_budget_sets_the_slots():
    model = tiny_model("llama_gqa_rope3")
    adapter = lp.LazyLLM(model).adapter
    one = slot_bytes(adapter, 64 + 8)
    scheduler = Scheduler(model, TOKENIZER, ServeConfig(max_batch=8, max_prompt_tokens=64, max_new_tokens=8,
                                                        kv_budget_gb=3.5 * one / 2**30), eos=set())
    try:
        r, out = request(prompt_ids(20), 2)
        scheduler.submit(r)
        wait([out])
        assert [p.engine.cache.batch for p in scheduler.pools.values()] == [3]
    finally:
        scheduler.close()


def test_an_engine_writes_its_whole_cache_when_built():
    """A server's memory must not grow as slots and positions are used for the first time (on the CPU, pages of
    `torch.empty` become resident when first written): the engine's K/V and Aux Cache are zeroed when it is built."""
    model = tiny_model("llama_gqa_rope3")
    scheduler = Scheduler(model, TOKENIZER, ServeConfig(max_batch=2, max_prompt_tokens=64, max_new_tokens=8), eos=set())
    try:
        r, out = request(prompt_ids(20), 2)
        scheduler.submit(r)
        wait([out])
        [pool] = scheduler.pools.values()
        cache = pool.engine.cache
        assert cache.clean == cache.capacity + 1  # every position, the scratch slot too
        assert r.slot == 0 and not cache.k[:, 1].any() and not cache.v[:, 1].any() and not cache.aux[1].any()
    finally:
        scheduler.close()


def test_a_failing_step_fails_its_requests_and_the_server_goes_on(monkeypatch, caplog):
    model = tiny_model("llama_gqa_rope3")
    scheduler = Scheduler(model, TOKENIZER, ServeConfig(schedule="paper", max_batch=2, max_prompt_tokens=64,
                                                        max_new_tokens=8), eos=set())
    real = lp.engine.Engine.decode
    calls = []

    def decode_once_broken(self, tokens, seqs):
        calls.append(seqs)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(self, tokens, seqs)

    monkeypatch.setattr(lp.engine.Engine, "decode", decode_once_broken)
    try:
        r, out = request(prompt_ids(30, seed=1), 8)
        scheduler.submit(r)
        wait([out])
        assert out.finish == "error" and "out of memory" in out.events[-1].error
        failed = [r for r in caplog.records if r.name == "lazyprefill.serving"]  # the operator sees where it failed
        assert len(failed) == 1 and "decode_once_broken" in caplog.text and failed[0].exc_info is not None
        r2, out2 = request(prompt_ids(30, seed=1), 8)
        scheduler.submit(r2)
        wait([out2])
    finally:
        scheduler.close()
    want = lp.LazyLLM(model, "paper").generate(prompt_ids(30, seed=1), max_new_tokens=8, eos_token_id=[])
    assert out2.finish == "length" and out2.tokens == want.new_tokens


def test_a_request_whose_engine_cannot_be_built_fails_alone(monkeypatch, caplog):
    """Admission that raises (here: the engine of a second schedule) ends that request with an error; the loop
    and the other requests go on."""
    model = tiny_model("llama_gqa_rope3")
    scheduler = Scheduler(model, TOKENIZER, ServeConfig(max_batch=2, max_prompt_tokens=64, max_new_tokens=6),
                          eos=set())
    real = lp.engine.Engine.__init__

    def no_dense(self, adapter, schedule, *args, **kw):
        if schedule.is_dense:
            raise RuntimeError("out of memory (simulated)")
        real(self, adapter, schedule, *args, **kw)

    monkeypatch.setattr(lp.engine.Engine, "__init__", no_dense)
    try:
        r1, out1 = request(prompt_ids(30, seed=1), 6, "dense")
        r2, out2 = request(prompt_ids(30, seed=2), 6)
        scheduler.submit(r1)
        scheduler.submit(r2)
        wait([out1, out2])
    finally:
        scheduler.close()
    assert out1.finish == "error" and "out of memory" in out1.events[-1].error
    assert out2.finish == "length" and len(out2.tokens) == 6
    assert "could not be admitted (schedule 'dense')" in caplog.text and "no_dense" in caplog.text


# ------------------------------------------------------------------------------------ prefix reuse
def reuse_scheduler(schedule: str, **config) -> Scheduler:
    config = {"max_batch": 2, "max_prompt_tokens": 120, "max_new_tokens": 12, "min_reuse_tokens": 8, **config}
    return Scheduler(tiny_model("gemma3"), TOKENIZER, ServeConfig(schedule=schedule, **config), eos=set())


def run(scheduler: Scheduler, prompt: torch.Tensor, new: int = 6) -> tuple[ServeRequest, Collector]:
    r, out = request(prompt, new)
    scheduler.submit(r)
    wait([out])
    return r, out


def test_dense_questions_about_one_document_reuse_its_prefill_and_get_fresh_answers():
    """Two questions about one document, then a chat's next turn (the first answer and a new question appended):
    each later request is prefilled only from where it parts from a cached sequence, and gets the tokens of
    LazyLLM.generate on its whole prompt (Gemma 3's window bites across the parts)."""
    observed: dict[str, float] = {}
    scheduler = reuse_scheduler("dense")
    scheduler.observe = lambda name, value: observed.__setitem__(name, observed.get(name, 0) + value)
    document, questions = prompt_ids(60, seed=1), [prompt_ids(7, seed=2), prompt_ids(9, seed=3)]
    lazy = lp.LazyLLM(tiny_model("gemma3"), None)
    try:
        first, out = run(scheduler, torch.cat([document, questions[0]]))
        assert first.reused == 0
        second, out2 = run(scheduler, torch.cat([document, questions[1]]))
        assert second.reused == 60 and second.prefill.computed == [9] * 6
        assert out2.tokens == lazy.generate(torch.cat([document, questions[1]]), 6, eos_token_id=[]).new_tokens
        turn = torch.cat([document, questions[0], torch.tensor(out.tokens), prompt_ids(5, seed=4)])
        third, out3 = run(scheduler, turn)
        assert third.reused == 60 + 7 + 5  # the first answer's last token was never fed back
        assert out3.tokens == lazy.generate(turn, 6, eos_token_id=[]).new_tokens
        assert observed["prefix_hits"] == 2 and observed["prefix_tokens_reused"] == 60 + 72
    finally:
        scheduler.close()


def test_a_pruned_schedule_reuses_only_when_the_server_allows_it():
    document, question = prompt_ids(60, seed=1), prompt_ids(7, seed=2)
    for allowed in (False, True):
        scheduler = reuse_scheduler("0:0.5,2:0.5+min=0", reuse_pruned=allowed)
        try:
            run(scheduler, torch.cat([document, prompt_ids(5, seed=9)]))
            again, _ = run(scheduler, torch.cat([document, question]))
            assert again.reused == (60 if allowed else 0)
            assert bool(scheduler.prefixes.entries) == allowed  # nothing copied that no request could reuse
            fresh = [67, 34, 34, 17, 17, 17]
            if allowed:  # the question's rows, and the held tokens it revived: less than a fresh prefill
                assert again.prefill.computed[0] == 7 and sum(again.prefill.computed) < sum(fresh)
            else:
                assert again.prefill.computed == fresh
        finally:
            scheduler.close()


def test_cached_prefixes_are_evicted_least_recently_used_within_the_budget():
    model = tiny_model("gemma3")
    one = slot_bytes(lp.LazyLLM(model).adapter, 120 + 12)
    # two slots, and room beside them for about two cached 50-token sequences
    scheduler = reuse_scheduler("dense", kv_budget_gb=(2 * one + 2.5 * 56 * one / 133) / 2**30)
    documents = [prompt_ids(50, seed=10 + i) for i in range(3)]
    try:
        for doc in documents:
            run(scheduler, doc, new=2)
        assert len(scheduler.prefixes.entries) == 2  # the first document's went
        assert run(scheduler, torch.cat([documents[0], prompt_ids(3)]), new=2)[0].reused == 0
        assert run(scheduler, torch.cat([documents[2], prompt_ids(3)]), new=2)[0].reused == 50
    finally:
        scheduler.close()


def test_the_warm_up_serves_one_request_that_leaves_nothing_behind():
    """The warm-up runs the default schedule's engine on a prompt long enough to be pruned (its prefill computes
    fewer rows than dense), caches nothing for reuse (where a client's pruned prompt would be), and changes no
    later answer."""
    model = tiny_model("llama_gqa_rope3")
    config = ServeConfig(schedule="0:0.5,2:0.5+min=200", max_batch=2, max_prompt_tokens=240, max_new_tokens=8,
                         min_reuse_tokens=8, reuse_pruned=True)
    scheduler = Scheduler(model, TOKENIZER, config, eos=set())
    built: list = []
    make = scheduler.make_engine
    scheduler.make_engine = lambda *args: built.append(make(*args)) or built[-1]
    try:
        assert scheduler.warm_up() > 0
        assert len(built) == 1 and list(scheduler.pools) == [config.schedule]
        assert built[0]._prefill_sizes[:, -1].max() == 60, "the warm-up's prompt (240 tokens) was not pruned"
        assert scheduler.prefixes.nbytes == 0
        prompt = prompt_ids(40, seed=11)
        _, out = run(scheduler, prompt)
        assert out.tokens == lp.LazyLLM(model, config.schedule).generate(prompt, 6, eos_token_id=[]).new_tokens
        assert scheduler.prefixes.nbytes > 0, "a client's request is cached"
    finally:
        scheduler.close()


def test_a_warm_up_that_fails_says_so():
    config = ServeConfig(max_batch=1, max_prompt_tokens=240, max_new_tokens=8)
    scheduler = Scheduler(tiny_model("llama_gqa_rope3"), TOKENIZER, config, eos=set())

    def broken(*_args):
        raise RuntimeError("no memory for the engine")

    scheduler.make_engine = broken
    try:
        with pytest.raises(RuntimeError, match=r"the warm-up request of 240 tokens failed: .*no memory"):
            scheduler.warm_up()
    finally:
        scheduler.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the loop's death is the case
def test_a_warm_up_whose_loop_ends_says_so():
    """A scheduler whose loop dies ends the requests it holds as cancelled: the warm-up must not report success
    and let the server listen with no loop."""
    scheduler = Scheduler(tiny_model("llama_gqa_rope3"), TOKENIZER,
                          ServeConfig(max_batch=1, max_prompt_tokens=240, max_new_tokens=8), eos=set())

    def broken() -> None:
        raise RuntimeError("the loop's own bug")

    scheduler._admit = broken
    try:
        with pytest.raises(RuntimeError, match="the warm-up request of 240 tokens failed: cancelled"):
            scheduler.warm_up()
        with pytest.raises(RuntimeError, match="was refused: the server is shutting down"):
            scheduler.warm_up()
    finally:
        scheduler.close()
