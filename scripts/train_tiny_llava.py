"""Train the embedded ``tiny-llava`` model on the bundled shapes data, on CPU, on one core.

    OMP_NUM_THREADS=1 python scripts/train_tiny_llava.py --out vlcompress/assets/models/tiny-llava

The result is a real HF ``LlavaForConditionalGeneration`` (a CLIP vision tower, LLaVA's
two-layer projector and a LLaMA decoder with grouped-query attention), saved in hub layout
with a word-level tokenizer, a ``LlavaProcessor`` (``CLIPImageProcessor`` + tokenizer + chat
template) and a generation config, so that ``AutoProcessor.from_pretrained(folder)`` and
``LlavaForConditionalGeneration.from_pretrained(folder)`` work offline and ``generate``
captions ("a small red circle at the top left") or answers questions ("what color is the
shape?" -> "red") from the processor's chat-templated prompt.

The vision tower starts from the shipped tiny-clip's (it already tells colours, shapes, sizes
and positions apart); projector and decoder start from random. Each training sequence is one
conversation, built with the model's own processor and chat template: the image, then either
:data:`CAPTION_PROMPT` answered by the sample's full caption or one of
``shapes.questions_of`` answered by its attribute. The loss covers the answer tokens and the
end-of-sequence token only.

Checkpoint selection never looks at the eval split: every ``--eval-every`` steps the model
captions ``--val-size`` held-out validation images (train generator indices
``[pool, pool + val-size)``; training draws only indices below ``--pool``) and answers one
question on each (``shapes.vqa_sample``), with greedy decoding; the checkpoint with the best
``(caption attribute accuracy + VQA exact match) / 2`` is kept. The eval split is measured
once, on that checkpoint, at the end (``--eval-size`` captions and questions), and written to
``--result`` with the commit, command, machine and versions.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's vlcompress

from vlcompress.data import shapes  # noqa: E402
from vlcompress.distill import lr_at  # noqa: E402

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
IMAGE, USER, ASSISTANT = "<image>", "<|user|>", "<|assistant|>"
SPECIALS = (PAD, UNK, BOS, EOS, IMAGE, USER, ASSISTANT)  # ids 0..6
CAPTION_PROMPT = "describe the picture."
#: what ``recover`` / ``--recover-steps`` start from on tiny-llava (its model card): trained from
#: scratch at 2e-3, a structurally sliced decoder recovers at 2e-4 over 300 steps (1e-3
#: overshoots; measured, generative_quality_*_lr2e-4.json and, at the merged HEAD,
#: generative_quality_recover_structured*.json). A reconstructed 2:4 model needs no recovery:
#: 2e-4 lowers its fidelity, 5e-5 less so (generative_quality_recover_24_*.json)
RECOVER_RECIPE = {"lr": 2e-4, "min_steps": 300,
                  "measured": "benchmarks/results/generative_quality_recover_structured.json"}
PATCH = 8  # tiny-clip's patch size: 48 px -> 6 x 6 = 36 image tokens (CLS dropped)
TINY_CLIP = ROOT / "vlcompress" / "assets" / "models" / "tiny-clip"

# <s><|user|> <image> question <|assistant|> answer </s>; content may be a string or
# HF's list of {"type": "image"} / {"type": "text", "text": ...} items.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|> "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image> "
    "{% elif item['type'] == 'text' %}{{ item['text'] }} {% endif %}{% endfor %}{% endif %}"
    "{% else %}<|assistant|> "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %} {{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer():
    """A lower-casing word-level tokenizer over the shapes caption + question vocabulary,
    with the image, user and assistant tokens as special tokens; pads on the left (batched
    generation). It adds no special tokens by itself: the chat template writes ``<s>``."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = shapes.vqa_vocabulary() + ["describe", ".", "?"]
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS,
        extra_special_tokens={"image_token": IMAGE}, padding_side="left", model_max_length=128)


def build_processor(tok):
    from transformers import CLIPImageProcessor, LlavaProcessor

    img = CLIPImageProcessor(
        size={"shortest_edge": shapes.IMAGE_SIZE},
        crop_size={"height": shapes.IMAGE_SIZE, "width": shapes.IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return LlavaProcessor(image_processor=img, tokenizer=tok, patch_size=PATCH,
                          vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                          image_token=IMAGE, num_additional_image_tokens=1)


def tiny_llava_config(vision_config, vocab_size: int, hidden: int = 128, layers: int = 4,
                      heads: int = 4, kv_heads: int = 2, intermediate: int = 352):
    """LLaVA-1.5's layout at toy size: the CLIP vision tower's last layer (CLS dropped, 36
    patch tokens) -> Linear-GELU-Linear projector -> a LLaMA decoder with ``heads`` query
    heads in ``kv_heads`` key/value groups (grouped-query attention) and a gated MLP."""
    from transformers import LlamaConfig, LlavaConfig

    n_img = (shapes.IMAGE_SIZE // PATCH) ** 2
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=128, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=2,
        eos_token_id=3, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision_config, text_config=text,
                       image_token_index=SPECIALS.index(IMAGE), image_seq_length=n_img,
                       vision_feature_layer=-1, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu")


def conversation(question: str, answer: str | None = None) -> list[dict]:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def tasks_of(color: str, shape: str, size: str, pos: str) -> list[tuple[str, str]]:
    """The (prompt, answer) pairs one image trains on: its full caption, then every question."""
    return [(CAPTION_PROMPT, shapes.full_caption_of(color, shape, size, pos)),
            *shapes.questions_of(color, shape, size, pos)]


class Encoder:
    """Token ids and loss masks of training conversations, built with the processor's chat
    template and image-token expansion, cached per distinct text (360 attribute
    combinations x 13 tasks)."""

    def __init__(self, processor):
        self.proc = processor
        self.assistant_id = processor.tokenizer.convert_tokens_to_ids(ASSISTANT)
        self.cache: dict[tuple[str, str], tuple[list[int], int]] = {}

    def __call__(self, prompt: str, answer: str) -> tuple[list[int], int]:
        key = (prompt, answer)
        if key not in self.cache:
            text = self.proc.apply_chat_template(conversation(prompt, answer), tokenize=False)
            ids = self.proc.tokenizer(text.replace(IMAGE, IMAGE * self.n_image_tokens),
                                      add_special_tokens=False)["input_ids"]
            start = ids.index(self.assistant_id) + 1  # loss on the answer and </s>
            self.cache[key] = (ids, start)
        return self.cache[key]

    @property
    def n_image_tokens(self) -> int:
        side = shapes.IMAGE_SIZE // self.proc.patch_size
        return side * side + self.proc.num_additional_image_tokens - (
            self.proc.vision_feature_select_strategy == "default")


def collate(seqs: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 outside the answer)."""
    n = max(len(ids) for ids, _ in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    labels = torch.full((len(seqs), n), -100, dtype=torch.long)
    for i, (s, start) in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        labels[i, start:len(s)] = ids[i, start:len(s)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_pool(processor, split: str, n: int, start: int = 0):
    """Pixel values (through the processor's image processor) and attributes of ``n`` samples."""
    imgs, attrs = [], []
    for i in range(start, start + n):
        im, s = shapes.sample(split, i)
        imgs.append(im)
        attrs.append((s.color, s.shape, s.size, s.position))
    px = torch.cat([processor.image_processor(imgs[i:i + 500], return_tensors="pt")["pixel_values"]
                    for i in range(0, len(imgs), 500)])
    return imgs, px, attrs


def normalize_answer(text: str) -> str:
    """VQA-style: lower case, punctuation and articles dropped, whitespace collapsed."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(w for w in words if w not in ("a", "an", "the"))


@torch.no_grad()
def generate(model, processor, images, prompts, max_new_tokens: int, batch: int = 64) -> list[str]:
    """Greedy answers to ``prompts`` about ``images``, batched with left padding."""
    outs = []
    for i in range(0, len(images), batch):
        texts = [processor.apply_chat_template(conversation(p), add_generation_prompt=True)
                 for p in prompts[i:i + batch]]
        enc = processor(images=images[i:i + batch], text=texts, padding=True,
                        return_tensors="pt")
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        outs += processor.batch_decode(gen[:, enc["input_ids"].shape[1]:],
                                       skip_special_tokens=True)
    return [o.strip() for o in outs]


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion k / n."""
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [round(c - h, 4), round(c + h, 4)]


def evaluate(model, processor, split: str, n: int, start: int = 0, intervals: bool = False,
             examples: int = 0) -> dict:
    """Greedy captions of ``n`` images of ``split`` scored by ``shapes.parse_caption`` (each of
    the four attributes, and all four at once), and one question on each image
    (``shapes.vqa_sample``) scored by exact match after normalisation."""
    was = model.training
    model.eval()
    idx = range(start, start + n)
    cap_imgs, truths = [], []
    for i in idx:
        im, s = shapes.sample(split, i)
        cap_imgs.append(im)
        truths.append({"color": s.color, "shape": s.shape, "size": s.size, "position": s.position})
    caps = generate(model, processor, cap_imgs, [CAPTION_PROMPT] * n, max_new_tokens=12)
    per = {a: 0 for a in shapes.ATTRIBUTES}
    whole = 0
    for cap, t in zip(caps, truths, strict=True):
        got = shapes.parse_caption(cap)
        ok = [got.get(a) == t[a] for a in shapes.ATTRIBUTES]
        for a, o in zip(shapes.ATTRIBUTES, ok, strict=True):
            per[a] += o
        whole += all(ok)
    vqa = [shapes.vqa_sample(split, i) for i in idx]
    answers = generate(model, processor, [im for im, _ in vqa], [v.question for _, v in vqa],
                       max_new_tokens=4)
    right = [normalize_answer(a) == normalize_answer(v.answer)
             for a, (_, v) in zip(answers, vqa, strict=True)]
    vqa_per = {a: [r for r, (_, v) in zip(right, vqa, strict=True) if v.attribute == a]
               for a in shapes.ATTRIBUTES}
    attr_k = sum(per.values())
    m = {"caption_attribute_accuracy": attr_k / (4 * n),
         **{f"caption_{a}_accuracy": per[a] / n for a in shapes.ATTRIBUTES},
         "caption_exact": whole / n,
         "vqa_exact_match": sum(right) / n,
         **{f"vqa_{a}_exact_match": sum(v) / max(1, len(v)) for a, v in vqa_per.items()}}
    if intervals:
        m["ci95"] = {"caption_attribute_accuracy": wilson(attr_k, 4 * n),
                     "caption_exact": wilson(whole, n), "vqa_exact_match": wilson(sum(right), n)}
        m["n"] = {"captions": n, "caption_attributes": 4 * n, "questions": n}
    if examples:
        m["examples"] = [{"caption": c, "truth": shapes.full_caption_of(
            t["color"], t["shape"], t["size"], t["position"])}
            for c, t in zip(caps[:examples], truths[:examples], strict=True)] + [
            {"question": v.question, "answer": a, "truth": v.answer}
            for a, (_, v) in zip(answers[:examples], vqa[:examples], strict=True)]
    model.train(was)
    return m


def build_model(tok, args):
    from transformers import CLIPModel, LlavaForConditionalGeneration

    clip = CLIPModel.from_pretrained(args.vision_init)
    cfg = tiny_llava_config(clip.config.vision_config, len(tok), args.hidden, args.layers,
                            args.heads, args.kv_heads, args.intermediate)
    model = LlavaForConditionalGeneration(cfg)
    model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())  # strict
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--vision-lr-scale", type=float, default=0.25,
                    help="the (pretrained) vision tower learns at this fraction of --lr")
    ap.add_argument("--caption-fraction", type=float, default=0.4,
                    help="share of training sequences that are captions (the rest questions)")
    ap.add_argument("--pool", type=int, default=8000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--val-size", type=int, default=240)
    ap.add_argument("--eval-size", type=int, default=720)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=352)
    ap.add_argument("--vision-init", default=str(TINY_CLIP),
                    help="a CLIP folder whose vision tower starts the model's")
    ap.add_argument("--out", default="vlcompress/assets/models/tiny-llava")
    ap.add_argument("--result", default=str(ROOT / "benchmarks/results/tiny_llava_eval.json"))
    args = ap.parse_args(argv)

    from transformers import GenerationConfig

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    t0 = time.time()
    tok = build_tokenizer()
    proc = build_processor(tok)
    model = build_model(tok, args)
    enc = Encoder(proc)
    print(f"params: {sum(p.numel() for p in model.parameters()):,} "
          f"(decoder {sum(p.numel() for p in model.model.language_model.parameters()):,})")
    # the cached encoding is the processor's own: check it on one sample
    im, s = shapes.sample("train", 0)
    ids, _ = enc(*tasks_of(s.color, s.shape, s.size, s.position)[0])
    ref = proc(images=[im], text=[proc.apply_chat_template(conversation(*tasks_of(
        s.color, s.shape, s.size, s.position)[0]))], return_tensors="pt")["input_ids"][0]
    assert ref.tolist() == ids, "cached encoding differs from the processor's"
    _, px, attrs = make_pool(proc, "train", args.pool)
    print(f"data: {time.time() - t0:.1f}s", flush=True)

    vision = [p for n, p in model.named_parameters() if ".vision_tower." in f".{n}"]
    vid = {id(p) for p in vision}
    rest = [p for p in model.parameters() if id(p) not in vid]
    opt = torch.optim.AdamW([{"params": rest, "lr": args.lr},
                             {"params": vision, "lr": args.lr * args.vision_lr_scale}],
                            weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(  # warm-up 5% of the steps, cosine to 0
        opt, lambda step: lr_at(step, args.steps, 1.0, "cosine", max_warmup=None))
    g = torch.Generator().manual_seed(args.seed)
    model.train()
    best, best_state, best_step, history = -1.0, None, 0, []
    for step in range(args.steps):
        idx = torch.randint(0, len(px), (args.batch,), generator=g).tolist()
        seqs = []
        for i in idx:
            tasks = tasks_of(*attrs[i])
            if torch.rand(1, generator=g).item() < args.caption_fraction:
                seqs.append(enc(*tasks[0]))
            else:
                seqs.append(enc(*tasks[1 + torch.randint(0, len(tasks) - 1, (1,),
                                                         generator=g).item()]))
        out = model(**collate(seqs), pixel_values=px[idx])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            m = {f"val_{k}": round(v, 4) for k, v in
                 evaluate(model, proc, "train", args.val_size, start=args.pool).items()}
            m.update(step=step + 1, loss=round(out.loss.item(), 4),
                     seconds=round(time.time() - t0, 1))
            history.append(m)
            print(json.dumps(m), flush=True)
            score = (m["val_caption_attribute_accuracy"] + m["val_vqa_exact_match"]) / 2
            if score >= best:
                best, best_step = score, step + 1
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    final = evaluate(model, proc, "eval", args.eval_size, intervals=True, examples=5)
    train_seconds = round(time.time() - t0, 1)
    print("final", json.dumps(final), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=2, eos_token_id=3, pad_token_id=0, do_sample=False, max_new_tokens=12)
    model.save_pretrained(out, safe_serialization=True)
    proc.save_pretrained(out)
    selection = {"on": f"validation: train generator indices [{args.pool}, "
                 f"{args.pool + args.val_size}) (one caption and one question each)",
                 "score": "(caption_attribute_accuracy + vqa_exact_match) / 2",
                 "step": best_step, "value": best}
    if str(ROOT / "benchmarks") not in sys.path:  # benchmarks/_common: results provenance
        sys.path.append(str(ROOT / "benchmarks"))
    from _common import command_line, write_result

    training = {"script": "scripts/train_tiny_llava.py", "command": command_line(),
                **{k: v for k, v in vars(args).items() if k not in ("out", "result")},
                "vision_init": "tiny-clip's vision tower", "seconds": train_seconds}
    data = {"train": f"shapes train generator indices [0, {args.pool})",
            "tasks": "the full caption for the prompt " + repr(CAPTION_PROMPT) + ", or one of "
                     "shapes.questions_of (12 templates, 3 per attribute)",
            "eval": f"shapes eval split indices [0, {args.eval_size}): one caption and one "
                    "question (shapes.vqa_sample) each"}
    (out / "vlcompress.json").write_text(json.dumps({
        "family": "llava",
        "description": "LLaVA-style captioner / VQA model trained by vlcompress on the bundled "
                       "shapes data (48px CLIP tower from tiny-clip, "
                       f"{args.layers}-layer LLaMA decoder, GQA {args.heads}q/{args.kv_heads}kv)",
        "caption_prompt": CAPTION_PROMPT,
        "training": training, "data": data, "selection": selection,
        "dense_metrics_eval": {k: v for k, v in final.items() if k != "examples"},
        "recover_recipe": RECOVER_RECIPE,
        "history": history,
    }, indent=2) + "\n")
    write_result("tiny_llava_eval", {"model": str(out), "training": training, "data": data,
                                     "selection": selection, "metrics": final,
                                     "threads": torch.get_num_threads()}, out=args.result)


if __name__ == "__main__":
    main()
