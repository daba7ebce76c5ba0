"""tiny-llava: the shipped generative model captions and answers, offline, from its own
processor and chat template; the training script's pieces and a two-step run."""

import importlib.util
import json
from pathlib import Path

import pytest

from vlcompress.data import shapes

_spec = importlib.util.spec_from_file_location(
    "train_tiny_llava", Path(__file__).parents[1] / "scripts" / "train_tiny_llava.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

SHIPPED = Path(__file__).parents[1] / "vlcompress" / "assets" / "models" / "tiny-llava"


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    proc = AutoProcessor.from_pretrained(SHIPPED)
    model = LlavaForConditionalGeneration.from_pretrained(SHIPPED).eval()
    return model, proc


def test_shipped_folder_is_a_small_hub_layout_llava():
    card = json.loads((SHIPPED / "vlcompress.json").read_text())
    assert card["family"] == "llava" and card["caption_prompt"] == train.CAPTION_PROMPT
    assert card["recover_recipe"] == train.RECOVER_RECIPE
    assert "scripts/train_tiny_llava.py" in card["training"]["command"]
    dense = card["dense_metrics_eval"]
    assert dense["caption_attribute_accuracy"] >= 0.95 and dense["vqa_exact_match"] >= 0.95
    for f in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
              "chat_template.jinja", "generation_config.json"):
        assert (SHIPPED / f).is_file(), f
    assert (SHIPPED / "model.safetensors").stat().st_size < 10 * 2**20  # a few MB
    cfg = json.loads((SHIPPED / "config.json").read_text())
    t = cfg["text_config"]
    assert cfg["model_type"] == "llava" and t["model_type"] == "llama"
    assert t["num_attention_heads"] > t["num_key_value_heads"] > 1  # GQA: groups to respect


def test_shipped_model_captions_held_out_images(shipped):
    """Greedy captions of eval images state the right colour, shape, size and position (an
    untrained model gets ~1/6, 1/6, 1/2 and 1/5 of these right by chance)."""
    model, proc = shipped
    pairs = [shapes.sample("eval", i) for i in range(8)]
    caps = train.generate(model, proc, [im for im, _ in pairs], [train.CAPTION_PROMPT] * 8,
                          max_new_tokens=12)
    right = sum(shapes.parse_caption(c).get(a) == getattr(s, a)
                for c, (_, s) in zip(caps, pairs, strict=True) for a in shapes.ATTRIBUTES)
    assert right >= 30, list(zip(caps, [s.full_caption for _, s in pairs], strict=True))


def test_shipped_model_answers_and_batches_with_left_padding(shipped):
    """Questions of different lengths in one left-padded batch get the answers they get one
    at a time, and those answers are right."""
    model, proc = shipped
    vqa = [shapes.vqa_sample("eval", i) for i in range(8)]
    imgs, qs = [im for im, _ in vqa], [v.question for _, v in vqa]
    assert len({len(q.split()) for q in qs}) > 1  # really padded
    batched = train.generate(model, proc, imgs, qs, max_new_tokens=4)
    alone = [train.generate(model, proc, [im], [q], max_new_tokens=4)[0]
             for im, q in zip(imgs, qs, strict=True)]
    assert batched == alone
    right = sum(train.normalize_answer(a) == v.answer for a, (_, v) in zip(batched, vqa,
                                                                           strict=True))
    assert right >= 7, list(zip(qs, batched, strict=True))


def test_chat_template_and_loss_mask():
    tok = train.build_tokenizer()
    proc = train.build_processor(tok)
    text = proc.apply_chat_template(train.conversation("what shape is it?"),
                                    add_generation_prompt=True)
    assert text == "<s><|user|> <image> what shape is it? <|assistant|>"
    enc = train.Encoder(proc)
    im, s = shapes.sample("train", 3)
    prompt, answer = train.tasks_of(s.color, s.shape, s.size, s.position)[12]  # the longest
    ids, start = enc(prompt, answer)
    ref = proc(images=[im], text=[proc.apply_chat_template(train.conversation(prompt, answer))],
               return_tensors="pt")["input_ids"][0].tolist()
    assert ids == ref and ids.count(tok.convert_tokens_to_ids(train.IMAGE)) == 36
    assert tok.decode(ids[start:]) == f"{answer} </s>"
    assert "<unk>" not in tok.convert_ids_to_tokens(ids)
    short = enc(*train.tasks_of(s.color, s.shape, s.size, s.position)[4])  # "what shape is it?"
    batch = train.collate([(ids, start), short])
    assert batch["input_ids"].shape == (2, len(ids))
    lab = batch["labels"][1]
    assert (lab != -100).sum() == len(short[0]) - short[1]  # the answer and </s> only
    assert batch["attention_mask"][1].sum() == len(short[0])


def test_normalize_answer_and_interval():
    assert train.normalize_answer(" The Top-Left. ") == "top left"
    assert train.normalize_answer("a red") == "red"
    lo, hi = train.wilson(95, 100)
    assert lo < 0.95 < hi and hi <= 1.0


def test_training_script_runs_and_saves_a_loadable_model(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out, res = tmp_path / "m", tmp_path / "r.json"
    train.main(["--steps", "2", "--eval-every", "1", "--pool", "24", "--val-size", "2",
                "--eval-size", "2", "--batch", "4", "--layers", "1", "--out", str(out),
                "--result", str(res)])
    card = json.loads((out / "vlcompress.json").read_text())
    assert [h["step"] for h in card["history"]] == [1, 2]
    assert card["selection"]["step"] in (1, 2)
    r = json.loads(res.read_text())
    assert r["provenance"]["command"].startswith("python") and r["metrics"]["n"]["questions"] == 2
    model = LlavaForConditionalGeneration.from_pretrained(out)
    proc = AutoProcessor.from_pretrained(out)
    # the vision tower started from tiny-clip's
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(train.TINY_CLIP)
    w = model.model.vision_tower.embeddings.patch_embedding.weight
    assert w.shape == clip.vision_model.embeddings.patch_embedding.weight.shape
    assert (w - clip.vision_model.embeddings.patch_embedding.weight).abs().max() < 2e-3  # 2 steps
    assert model.config.text_config.num_hidden_layers == 1
    im, _ = shapes.sample("eval", 0)
    assert isinstance(train.generate(model, proc, [im], ["where is the shape?"], 3)[0], str)
