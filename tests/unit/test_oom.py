"""Out of device memory, without Ray: the denoiser's split-and-restart (`run_splitting` over a real
`DenoiseWorker` in this process) and the VAE decoder's halving, driven by the injected fault
(`DIT_SERVE_FAULT_OOM_PIXELS`); and per-item isolation in the text encoder and the VAE decoder.

Every image of a split batch must equal its solo run (seeds are per image); an image that does not
fit alone fails its own request with a 400 naming `size`; the worker stays usable.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from deployments.denoise_loop import DenoiseItem, run_group
from deployments.denoise_split import Part, halves, merge, run_splitting
from deployments.errors import InsufficientMemory, StageFailure
from deployments.oom import FAULT_ENV, forward_freeing, run_halving
from deployments.payloads import GenerationSpec, Latents, PromptEmbeddings, Rejected
from deployments.sampling import SamplingParams

LATENT_TOL = 1e-5  # a row's latents alone vs in a batch (BLAS blocking differs with the batch)
STEPS = 4
ROW = 64 * 64  # the pixels of one 64x64 image


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def config(tiny_flux_path):
    from serve_app.config import AppConfig

    stage = {"torch_threads": 1, "device": "cpu"}  # "auto" would ask Ray for GPU ids
    return AppConfig.model_validate(
        {"text_encoder": stage, "denoiser": {**stage, "worker_num_cpus": 1}, "vae_decoder": stage}
    )


class LocalGroup:
    """The `WorkerGroup` calls `run_group` makes (begin, step, finish, abort), answered in this
    process by one real `DenoiseWorker` (a group of one rank, as an SP=1 replica has)."""

    broken = None

    def __init__(self, worker):
        self.worker = worker
        self._inputs = None

    def begin(self, inputs) -> None:
        self._inputs = inputs

    def step(self, keep, preview_rows):
        inputs, self._inputs = self._inputs, None
        keep = None if keep is None else list(keep)
        return asyncio.ensure_future(self._call(self.worker.step, keep, list(preview_rows), inputs))

    @staticmethod
    async def _call(fn, *args):
        return fn(*args)

    async def finish(self):
        return self.worker.finish()

    async def abort(self) -> None:
        self.worker.abort()


@pytest.fixture(scope="module")
def group(config):
    from deployments.sp_group import DenoiseWorker

    worker = DenoiseWorker(config, 0)
    worker.setup(None)
    return LocalGroup(worker)


@pytest.fixture
def store(tmp_path):
    from deployments.job_store import open_job_store

    return open_job_store("sqlite", path=str(tmp_path / "jobs.db"))


def item(job_id: str, seeds: tuple[int, ...], width: int = 64, height: int = 64) -> DenoiseItem:
    g = torch.Generator().manual_seed(seeds[0])
    embeddings = PromptEmbeddings(job_id, torch.randn(1, 512, 32, generator=g), torch.randn(1, 32, generator=g))
    return DenoiseItem(GenerationSpec(job_id, SamplingParams(height, width, STEPS, 3.5, seeds)), embeddings)


def progress_for(store, ids):
    from deployments.job_store.base import RUNNING, JobRecord
    from deployments.progress import StageProgress

    for job_id in ids:
        store.create(JobRecord(job_id, "job", "t", {}, status=RUNNING, lease_expires=1e12))
    return StageProgress(store, "denoiser")


def in_loop(scenario):
    """Run `scenario()` in an event loop of its own (a StageProgress belongs to one loop)."""

    async def main():
        out = await scenario()
        return out

    return asyncio.run(main())


def test_halves_cut_a_request_across_the_middle_and_merge_puts_it_back():
    parts = [Part(0, 0, 1), Part(1, 0, 3), Part(2, 0, 1)]
    first, second = halves(parts)
    assert first == [Part(0, 0, 1), Part(1, 0, 1)]
    assert second == [Part(1, 1, 3), Part(2, 0, 1)]
    assert halves(second) == ([Part(1, 1, 2)], [Part(1, 2, 3), Part(2, 0, 1)])
    rows = {p: torch.full((p.rows, 2), float(p.origin * 10 + p.start)) for p in first + second}
    merged = merge([None] * 3, [(p, rows[p]) for p in second + first])  # any order of parts
    assert merged[1].tolist() == [[10.0, 10.0], [11.0, 11.0], [11.0, 11.0]]
    stop = Rejected("b", InsufficientMemory("x", "size"))
    assert merge([None] * 3, [(first[0], rows[first[0]]), (first[1], stop), (second[1], rows[second[1]])])[1] is stop


def test_a_batch_over_memory_is_split_and_every_image_equals_its_solo_run(group, store, monkeypatch):
    """5 rows (requests of 1, 3 and 1 images) with room for 2 at a time: split down to fitting
    halves, the 3-image request across three batches; every image equals the same seed alone,
    every request reports steps 1..4 once, and the worker goes on."""
    items = [item("a", (1,)), item("b", (20, 21, 22)), item("c", (3,))]
    solo = [in_loop(lambda: run_group(group, [it], progress_for(store, []))) for it in items]
    solo = [out[0] for out in solo]
    progress = progress_for(store, ["a", "b", "c"])
    monkeypatch.setenv(FAULT_ENV, str(2 * ROW))

    async def split():
        out = await run_splitting(group, items, progress)
        await progress.flush()
        return out

    out = in_loop(split)
    for got, want in zip(out, solo):
        assert isinstance(got, torch.Tensor) and got.shape == want.shape
        assert (got - want).abs().max().item() <= LATENT_TOL
    for job_id in "abc":
        steps = [e.data["step"] for e in store.events(job_id) if e.type == "step"]
        assert steps == list(range(1, STEPS + 1)), (job_id, steps)
    assert group.worker._run is None
    monkeypatch.delenv(FAULT_ENV)
    again = in_loop(lambda: run_group(group, items[:1], progress_for(store, [])))[0]
    assert (again - solo[0]).abs().max().item() <= LATENT_TOL


def test_an_image_that_does_not_fit_alone_fails_its_request_with_a_400_naming_size(group, store, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, str(ROW))  # one 64x64 image fits, one 64x96 does not
    big = [item("big", (5, 6), height=96), item("big2", (7,), height=96)]
    out = in_loop(lambda: run_splitting(group, big, progress_for(store, ["big", "big2"])))
    for got, job_id in zip(out, ["big", "big2"]):
        assert isinstance(got, Rejected) and got.request_id == job_id
        error = got.error
        assert isinstance(error, InsufficientMemory) and error.status == 400 and error.param == "size"
        assert "64x96" in error.message and "reduce size" in error.message
    fits = in_loop(lambda: run_splitting(group, [item("small", (8,))], progress_for(store, ["small"])))[0]
    assert isinstance(fits, torch.Tensor) and fits.shape[0] == 1


def test_a_failure_that_is_not_memory_propagates_and_leaves_the_worker_clean(group, store):
    bad = item("bad", (9,))
    bad = DenoiseItem(bad.spec, PromptEmbeddings("bad", torch.randn(1, 512, 31), torch.randn(1, 32)))
    with pytest.raises(RuntimeError):
        in_loop(lambda: run_splitting(group, [bad], progress_for(store, ["bad"])))
    assert group.worker._run is None
    good = in_loop(lambda: run_splitting(group, [item("good", (10,))], progress_for(store, ["good"])))[0]
    assert isinstance(good, torch.Tensor) and torch.isfinite(good).all()


def test_forward_freeing_drops_the_batch_and_raises_a_fresh_oom():
    dropped = []

    def forward():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate") as info:
        forward_freeing(forward, on_oom=lambda: dropped.append(True))
    assert dropped == [True]
    frames, tb = [], info.value.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert "forward" not in frames and info.value.__context__ is None  # the forward's frames are gone

    def other():
        raise ValueError("not memory")

    with pytest.raises(ValueError):
        forward_freeing(other, on_oom=lambda: dropped.append(False))
    assert dropped == [True]


def test_run_halving_splits_until_rows_fit_and_marks_rows_that_do_not():
    calls = []

    def run(rows):
        calls.append(list(rows))
        if len(rows) > 2 or 5 in rows:
            raise torch.OutOfMemoryError("injected")
        return [r * 10 for r in rows]

    assert run_halving(run, range(7), "test") == [0, 10, 20, 30, 40, None, 60]
    assert calls[0] == list(range(7)) and [5] in calls


# -- the VAE decoder and the text encoder, their replica classes outside Serve ------------------


@pytest.fixture(scope="module")
def decoder(config):
    from deployments.vae_decoder import VAEDecoder

    return VAEDecoder.func_or_class(config)


def latents_for(job_id: str, n: int, seed: int, width: int = 64, height: int = 64) -> Latents:
    g = torch.Generator().manual_seed(seed)
    tokens = (width // 16) * (height // 16)
    spec = GenerationSpec(job_id, SamplingParams(height, width, STEPS, 3.5, tuple(range(seed, seed + n))))
    return Latents(spec, torch.randn(n, tokens, 16, generator=g))


def decoded(out) -> list[np.ndarray]:
    """The decode thread's images (PIL; encoding happens after, on the encoding pool)."""
    return [np.asarray(image, dtype=np.int16) for image in out.images]


def test_vae_batch_over_memory_is_decoded_in_halves_with_the_same_images(decoder, monkeypatch):
    items = [latents_for("a", 1, 1), latents_for("b", 2, 2), latents_for("c", 1, 3)]
    alone = [decoder._decode_isolated([it])[0] for it in items]
    monkeypatch.setenv(FAULT_ENV, str(ROW))  # one image at a time
    out = decoder._decode_isolated(items)
    for got, want in zip(out, alone):
        assert got.request_id == want.request_id and len(got.images) == len(want.images)
        for a, b in zip(decoded(got), decoded(want)):
            assert np.abs(a - b).max() <= 1


def test_vae_image_that_does_not_fit_alone_fails_only_its_request(decoder, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, str(ROW))  # 64x64 fits, 64x96 does not
    out = decoder._decode_isolated([latents_for("small", 1, 4), latents_for("tall", 1, 5, height=96)])
    assert len(out[0].images) == 1
    assert isinstance(out[1], Rejected) and out[1].request_id == "tall"
    assert isinstance(out[1].error, InsufficientMemory) and out[1].error.param == "size"
    assert "VAE decoder" in out[1].error.message and "64x96" in out[1].error.message


def test_vae_batch_with_one_bad_item_fails_that_item_only(decoder):
    good = [latents_for("g1", 1, 6), latents_for("g2", 2, 7)]
    broken = latents_for("bad", 1, 8)
    broken = Latents(broken.spec, broken.latents[:, :7])  # not the token count of its size
    out = decoder._decode_isolated([good[0], broken, good[1]])
    assert isinstance(out[1], Rejected) and isinstance(out[1].error, StageFailure)
    assert out[1].error.request_id == "bad" and "bad" in str(out[1].error)
    for got, it in zip([out[0], out[2]], good):
        want = decoder._decode_isolated([it])[0]
        assert [np.abs(a - b).max() for a, b in zip(decoded(got), decoded(want))] == [0] * it.spec.n


def test_text_encoder_batch_with_one_bad_prompt_fails_that_prompt_only(config):
    from deployments.errors import InvalidParameter
    from deployments.payloads import EncodeRequest, PromptEmbeddings as Embeddings
    from deployments.text_encoder import TextEncoder

    encoder = TextEncoder.func_or_class(config)
    requests = [
        EncodeRequest("p1", "a red fox"),
        EncodeRequest("bad", None),  # a prompt the tokenizer cannot take
        EncodeRequest("long", "word " * 600),  # a client error: over the token limit
        EncodeRequest("p2", "a blue whale"),
    ]
    out = encoder._encode_isolated(requests)
    assert isinstance(out[1], Rejected) and isinstance(out[1].error, StageFailure)
    assert out[1].error.request_id == "bad"
    assert isinstance(out[2], Rejected) and isinstance(out[2].error, InvalidParameter)
    assert out[2].error.param == "prompt"
    for got, request in zip([out[0], out[3]], [requests[0], requests[3]]):
        want = encoder._encode_isolated([request])[0]
        assert isinstance(got, Embeddings) and got.request_id == request.request_id
        assert (got.prompt_embeds - want.prompt_embeds).abs().max().item() <= 1e-5


def test_images_are_encoded_off_the_decode_thread_and_a_failed_encoding_fails_only_its_request(decoder, monkeypatch):
    import asyncio
    import threading

    from PIL import Image

    from deployments.image_codec import encode_image
    from deployments.vae_decoder import Decoded
    from tests.helpers import decode_image

    good, bad = (decoder._decode_isolated([latents_for(i, 2, s)])[0] for i, s in (("good", 9), ("bad", 10)))
    # PNG cannot hold 32-bit float pixels: PIL raises while encoding this request's second image.
    bad = Decoded(bad.spec, (bad.images[0], Image.new("F", (64, 64))), bad.trace)
    threads = set()

    def spy(*args):
        threads.add(threading.current_thread().name)
        return encode_image(*args)

    monkeypatch.setattr("deployments.vae_decoder.encode_image", spy)

    async def both():
        return await asyncio.wait_for(asyncio.gather(decoder._encode(good), decoder._encode(bad)), 30)

    out_good, out_bad = asyncio.run(both())
    assert threads and all(name.startswith("encode") for name in threads)  # the pool, not the loop
    assert isinstance(out_bad, Rejected) and isinstance(out_bad.error, StageFailure)
    assert out_bad.request_id == "bad"
    assert [decode_image(b).tolist() for b in out_good.images] == [a.tolist() for a in decoded(good)]
    assert out_good.trace[-1].stage == "encode" and out_good.trace[-1].batch_size == 2


def test_png_level_changes_the_bytes_not_the_pixels(decoder):
    from deployments.image_codec import encode_image
    from tests.helpers import decode_image

    image = decoder._decode_isolated([latents_for("png", 1, 11)])[0].images[0]
    stored, packed = encode_image(image, "png", png_level=0), encode_image(image, "png", png_level=9)
    assert len(stored) > len(packed)
    assert decode_image(stored).tolist() == decode_image(packed).tolist() == decoded_one(image)


def decoded_one(image) -> list:
    return np.asarray(image.convert("RGB"), dtype=np.int16).tolist()
