"""Seeded sampling on BLIP captioning / VQA exports (issue 28 item 2) and batched BLIP
generation: the ONNX Runtime loop (BlipOrtGenerator) and its PyTorch twin (BlipTorchGenerator)
draw with the same Sampling; a seed repeats, other seeds differ, top-k 1 is greedy, every
drawn token lies in the kept set transformers' warpers compute, and the draws follow the
distribution. Left-padded caption starts of different lengths give each row its answer alone;
VQA questions of different lengths are grouped (a padded question changes the answer, as in
transformers). Tiny random BLIPs (tests/blip_caption_factory.py), exported in seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from blip_caption_factory import make_tiny_blip_caption_folder
from typer.testing import CliRunner

from vlcompress.cli import app
from vlcompress.data import load_eval
from vlcompress.models import load_model
from vlcompress.runtime.gen_inputs import BlipPromptEncoder
from vlcompress.runtime.ort_generate import Sampling, read_spec, token_loop
from vlcompress.runtime.ort_generate_blip import BlipOrtGenerator
from vlcompress.runtime.torch_generate import BlipTorchGenerator

QUESTIONS = ["what color is it ?", "where is the shape in the picture ?", "size",
             "what color is it ?"]
PROMPTS = ["a picture of", "", "the shape in the picture is", None]
N = 8


@pytest.fixture(scope="module", params=["caption", "vqa"])
def setup(request, tmp_path_factory):
    """(vlm, ONNX generator, PyTorch generator, encoder, rows) of one tiny BLIP export."""
    from vlcompress.exporters.generative_blip import export_blip

    vqa = request.param == "vqa"
    root = tmp_path_factory.mktemp(f"blipsample-{request.param}")
    folder = make_tiny_blip_caption_folder(root, seed=3, vqa=vqa)
    vlm = load_model(str(folder))
    images = load_eval("shapes", n=4, batch_size=4).images
    export_blip(vlm, root / "e", images=images, questions=QUESTIONS if vqa else None,
                max_new_tokens=4, validate=False)
    og = BlipOrtGenerator(root / "e", threads=1)
    enc = BlipPromptEncoder(folder, vlm.family, read_spec(root / "e"))
    rows = enc.encode(list(images), QUESTIONS if vqa else PROMPTS)
    return vlm, og, BlipTorchGenerator(vlm), enc, rows


def _same_length(enc, rows):
    """Every caption row; VQA: the two questions of one length (never padded)."""
    return [rows[0], rows[3]] if enc.vqa else rows


def _gen(gen, feeds, n=N, sampling=None):
    return gen.generate(feeds["input_ids"], feeds["attention_mask"], feeds["pixel_values"], n,
                        question_ids=feeds.get("question_ids"),
                        question_mask=feeds.get("question_mask"), sampling=sampling)


def _prefill(gen, feeds, n=N):
    return gen.prefill(feeds["input_ids"], feeds["attention_mask"], feeds["pixel_values"], n,
                       question_ids=feeds.get("question_ids"),
                       question_mask=feeds.get("question_mask"))


def _kept(logits: np.ndarray, s: Sampling) -> np.ndarray:
    """The tokens transformers' warpers keep (temperature, top-k, top-p, in its order):
    an independent reference for Sampling.probs' support."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    x = torch.from_numpy(logits.astype(np.float32))
    x = TemperatureLogitsWarper(s.temperature)(None, x)
    if s.top_k:
        x = TopKLogitsWarper(s.top_k)(None, x)
    if s.top_p < 1:
        x = TopPLogitsWarper(s.top_p)(None, x)
    return torch.isfinite(x).numpy()


def test_seeded_sampling_repeats_differs_and_matches_the_pytorch_twin(setup):
    vlm, og, tg, enc, rows = setup
    feeds = enc.batch(_same_length(enc, rows))
    if enc.vqa:
        assert feeds["question_mask"].all()
    greedy = _gen(og, feeds)
    assert greedy == _gen(tg, feeds)
    hot = Sampling(temperature=2.0, seed=1)
    # spread-out distributions: the first token's most likely one has well under half the mass
    first = hot.probs(_prefill(og, feeds).logits)
    assert first.max(-1).max() < 0.5, first.max(-1)
    a = _gen(og, feeds, sampling=hot)
    assert a == _gen(og, feeds, sampling=hot)  # the same seed, the same tokens
    assert a == _gen(tg, feeds, sampling=hot)  # PyTorch's twin draws the same
    others = [_gen(og, feeds, sampling=Sampling(temperature=2.0, seed=s)) for s in (2, 3)]
    assert all(o != a for o in others) and a != greedy
    assert sum(map(len, a)) > len(a)  # real answers, not cut at the first token
    # top-k 1 (and a top-p below every probability) keep only the arg-max: greedy at any
    # temperature
    assert _gen(og, feeds, sampling=Sampling(temperature=3.0, top_k=1, seed=4)) == greedy
    assert _gen(og, feeds, sampling=Sampling(temperature=3.0, top_p=1e-6, seed=4)) == greedy
    assert _gen(tg, feeds, sampling=Sampling(temperature=3.0, top_k=1, seed=4)) == greedy


@pytest.mark.parametrize("t,k,p", [(1.5, 5, 1.0), (1.0, 0, 0.6), (2.0, 8, 0.8)])
def test_every_drawn_token_is_in_the_kept_set(setup, t, k, p):
    """The loop's draws, recorded with the logits they were drawn from: the same tokens as
    generate with that seed, each inside the set transformers' warpers keep, at steps where
    that set excludes real mass (so a draw from the wrong distribution would be caught)."""
    vlm, og, tg, enc, rows = setup
    feeds = enc.batch(_same_length(enc, rows))
    s = Sampling(t, k, p, seed=7)
    seen = []
    rng = np.random.default_rng(s.seed)

    def choose(logits):
        tok = s.choose(logits, rng)
        seen.append((logits.copy(), tok))
        return tok

    st = _prefill(og, feeds)
    got = token_loop(og, st, N, int(og.spec["sep_token_id"]), int(og.spec["pad_token_id"]),
                     choose)
    assert got == _gen(og, feeds, sampling=s)
    excluded = 0.0
    for logits, tok in seen:
        kept = _kept(logits, s)
        assert kept[np.arange(len(tok)), tok].all()
        probs = s.probs(logits)
        assert ((probs > 0) == kept).all()  # our support is transformers'
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-9)
        if k:
            assert (kept.sum(-1) <= k).all()
        warm = Sampling(t).probs(logits)  # temperature alone
        excluded = max(excluded, float((warm * ~kept).sum(-1).max()))
    assert len(seen) >= 2 and excluded > 0.05


def test_draws_follow_the_distribution(setup):
    """A batch of copies of one row, one new token each: the histogram of the draws is within
    chance of Sampling.probs (total variation below its 99.9% quantile at this count), and
    not of a colder distribution. A row that drew [SEP] or [PAD] comes back empty: one bin."""
    from vlcompress.runtime.genai_generate import draw_check

    vlm, og, tg, enc, rows = setup
    one = enc.batch(rows[:1])
    rep = {k: np.repeat(v, 400, 0) for k, v in one.items()}
    sep, pad = int(og.spec["sep_token_id"]), int(og.spec["pad_token_id"])
    logits = _prefill(og, one).logits
    s = Sampling(1.5, 12, 0.95, seed=0)
    draws = [r[0] if r else sep for r in _gen(og, rep, n=1, sampling=s)]

    def binned(q):
        q = q[0].copy()
        q[sep] += q[pad]
        q[pad] = 0.0
        return q

    assert draw_check(binned(s.probs(logits)), draws)["ok"]
    assert not draw_check(binned(Sampling(0.4, 12, 0.95).probs(logits)), draws)["ok"]


def test_batched_rows_equal_rows_alone(setup):
    """Greedy: caption starts of different lengths, left-padded in one batch, give each row
    its tokens alone (ONNX Runtime and PyTorch). VQA: the encoder groups questions by length
    (never padded), so each row is its answer alone too; a question padded into a batch reads
    its padding (transformers' BLIP does not mask the question states it cross-attends), which
    changes its logits, on ONNX Runtime as in PyTorch."""
    vlm, og, tg, enc, rows = setup
    alone = [_gen(og, enc.batch([r]))[0] for r in rows]
    assert len({tuple(a) for a in alone}) > 1
    assert enc.generate(og, rows, [N] * len(rows)) == alone
    assert enc.generate(tg, rows, [N] * len(rows)) == alone
    s = Sampling(2.0, seed=5)  # sampled: seeded per group call, repeatable
    assert enc.generate(og, rows, [N] * 4, s) == enc.generate(og, rows, [N] * 4, s)
    feeds = enc.batch(rows)
    if not enc.vqa:
        assert len({len(r["start"]) for r in rows}) > 1 and not feeds["attention_mask"].all()
        assert _gen(og, feeds) == alone and _gen(tg, feeds) == alone
        assert enc.groups(rows) == [[0, 1, 2, 3]]
        return
    assert enc.groups(rows) == [[0, 3], [1], [2]]  # by question length
    assert not feeds["question_mask"].all()
    padded = _prefill(og, feeds).logits
    np.testing.assert_allclose(padded, _prefill(tg, feeds).logits, atol=1e-4, rtol=1e-3)
    short = [i for i, r in enumerate(rows) if len(r["question"]) < feeds["question_ids"].shape[1]]
    for i in short:
        own = _prefill(og, enc.batch([rows[i]])).logits[0]
        assert np.abs(padded[i] - own).max() > 1e-3, i


def test_cli_generate_sample_on_blip_runs(tmp_path):
    """`vlcompress generate --sample` on a BLIP captioning and a VQA run: the text of
    BlipOrtGenerator's seeded draws, repeatable, other seeds differ, --top-k 1 is the greedy
    answer; --reduced-tokens is still refused in one line."""
    from test_serve_blip import make_blip_run

    from vlcompress.runtime.gen_inputs import read_image

    runner = CliRunner()
    img = tmp_path / "x.png"
    load_eval("shapes", n=1, batch_size=1).images[0].save(img)
    for vqa, prompt in ((False, "a picture of"), (True, "what color is it ?")):
        run = make_blip_run(tmp_path / ("vqa" if vqa else "cap"), vqa=vqa, variants=("pruned",))
        args = ["generate", str(run), "--image", str(img), "--prompt", prompt,
                "--max-new-tokens", "6"]

        def cli(*extra, args=args):
            res = runner.invoke(app, [*args, *extra])
            assert res.exit_code == 0, res.output
            return res.stdout.strip()

        spec = read_spec(run / "pruned")
        enc = BlipPromptEncoder(run / "pruned" / "model", "blip", spec)
        gen = BlipOrtGenerator(run / "pruned")
        rows = enc.encode([read_image(img)], [prompt])
        s = Sampling(2.5, 0, 0.95, seed=1)
        want = enc.decode(enc.generate(gen, rows, [6], s)[0])
        sampled = cli("--sample", "--seed", "1", "--temperature", "2.5", "--top-p", "0.95")
        assert sampled == want and sampled == cli("--sample", "--seed", "1", "--temperature",
                                                  "2.5", "--top-p", "0.95")
        others = {cli("--sample", "--seed", str(n), "--temperature", "2.5") for n in (2, 3, 4)}
        assert len(others | {sampled}) > 1
        greedy = cli()
        assert greedy == enc.decode(enc.generate(gen, rows, [6])[0])
        assert cli("--sample", "--top-k", "1", "--temperature", "4", "--seed", "9") == greedy
    bad = runner.invoke(app, [*args, "--reduced-tokens"])
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert bad.exit_code == 2 and len(lines) == 1 and "--reduced-tokens" in lines[0], bad.output
