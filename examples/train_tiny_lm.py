"""Train the small byte-level Llama that kompakt's accuracy harness measures perplexity on.

    python examples/train_tiny_lm.py [--minutes 20] [--out kompakt/eval/data]

Corpus: the King James Bible (public domain), from Debian's packages `bible-kjv-text` (the text)
and `bible-kjv` (the `bible` program that decodes it), fetched with `apt-get download` and
unpacked locally (nothing is installed system-wide); or from a plain-text file given with
--corpus. Verse numbers are dropped; one verse per line, a header line per chapter.

Split: the last 5% of the text (cut at a chapter boundary) is held out for evaluation; 64 KiB of
evenly spaced 512-byte pieces of the training part are kept for calibration. Both are written
next to the weights, since the harness needs them at test time.

Model: LlamaForCausalLM, bytes as tokens (vocabulary 256), hidden 256, MLP 768, 4 layers, 4 heads,
context 256; 3.5M parameters, saved in float16 (7 MB). Training: AdamW (lr 1e-3, betas 0.9/0.95,
weight decay 0.1), 100 warm-up steps then cosine decay to 10%, batches of 16 random 256-byte
windows, gradient clipping at 1.0, seed 0, for a fixed wall-clock budget.

Perplexity convention (kompakt.eval.perplexity): non-overlapping 256-byte windows of the held-out
text; every byte after the first of a window is predicted; ppl = exp(mean negative log-likelihood).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import transformers as hf

from kompakt.eval.perplexity import perplexity

SEQ = 256
CONFIG = dict(
    vocab_size=256,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=SEQ,
    tie_word_embeddings=False,
)


def kjv_text() -> str:
    """The KJV as plain text, via Debian's packages (downloaded, unpacked in a temp folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "bible-kjv-text", "bible-kjv"], cwd=tmp, check=True)
        for deb in Path(tmp).glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "root")], check=True)
        root = Path(tmp) / "root"
        raw = subprocess.run(
            [str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "Gen1:1-Rev22:21"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    return clean(raw)


def clean(raw: str) -> str:
    """One verse per line without its number; chapter headers kept ("Genesis 1")."""
    lines, verse = [], []
    for line in raw.splitlines():
        text = line.strip()
        if not text:
            continue
        match = re.match(r"^(\d+) (.*)$", text)
        if match and line.startswith(" "):
            if verse:
                lines.append(" ".join(verse))
            verse = [match[2]]
        elif verse and not re.match(r"^(\d )?[A-Z][a-z]+( [A-Z][a-z]+)* \d+$", text):
            verse.append(text)
        else:  # a chapter header
            if verse:
                lines.append(" ".join(verse))
                verse = []
            lines.append(text)
    if verse:
        lines.append(" ".join(verse))
    return "\n".join(lines) + "\n"


def split(text: str) -> tuple[bytes, bytes, bytes]:
    data = text.encode("ascii", errors="ignore")
    cut = data.rfind(b"\n", 0, int(len(data) * 0.95))
    header = re.search(rb"\n[1-3]? ?[A-Z][a-z]+(?: [A-Z][a-z]+)* \d+\n", data[cut:])
    cut = cut + header.start() + 1 if header else cut + 1
    train, heldout = data[:cut], data[cut:]
    pieces = 128
    step = len(train) // pieces
    calibration = b"".join(train[i * step : i * step + 512] for i in range(pieces))
    return train, heldout, calibration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--corpus", type=Path, help="plain-text corpus instead of the KJV packages")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent.parent / "kompakt/eval/data"
    )
    args = parser.parse_args()

    text = args.corpus.read_text() if args.corpus else kjv_text()
    train, heldout, calibration = split(text)
    print(
        f"corpus {len(train) + len(heldout):,} bytes: train {len(train):,}, held out {len(heldout):,}"
    )

    torch.manual_seed(0)
    model = hf.LlamaForCausalLM(hf.LlamaConfig(**CONFIG))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    data = torch.frombuffer(bytearray(train), dtype=torch.uint8).long()
    generator = torch.Generator().manual_seed(0)
    budget = args.minutes * 60
    start = time.time()
    step = 0
    estimated_steps = None
    while time.time() - start < budget:
        elapsed = time.time() - start
        if step == 20:
            estimated_steps = int(budget / (elapsed / 20))
        total = estimated_steps or 10_000
        progress = min(step / total, 1.0)
        lr = (
            1e-3
            * min(1.0, (step + 1) / 100)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(data) - SEQ, (16,), generator=generator)
        batch = torch.stack([data[s : s + SEQ] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0:
            print(
                f"step {step} loss {loss.item():.3f} lr {lr:.2e} ({elapsed / 60:.1f} min)",
                flush=True,
            )
        step += 1

    model.eval()
    model = model.half().float()  # evaluate exactly what is saved (float16 weights)
    ppl = perplexity(lambda ids: model(input_ids=ids).logits, heldout)
    print(f"done: {step} steps, held-out byte perplexity {ppl:.3f}")

    out = args.out
    (out / "tiny_lm").mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(out / "tiny_lm", safe_serialization=True)
    (out / "kjv_heldout.txt").write_bytes(heldout)
    (out / "kjv_calibration.txt").write_bytes(calibration)
    (out / "tiny_lm" / "training.json").write_text(
        json.dumps(
            {
                "corpus": "King James Bible (public domain), Debian packages bible-kjv-text 4.38 + bible-kjv",
                "train_bytes": len(train),
                "heldout_bytes": len(heldout),
                "steps": step,
                "tokens_seen": step * 16 * SEQ,
                "minutes": round((time.time() - start) / 60, 1),
                "heldout_byte_perplexity": round(ppl, 4),
                "perplexity_convention": "non-overlapping 256-byte windows, all but the first byte predicted",
                "date": time.strftime("%Y-%m-%d"),
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
