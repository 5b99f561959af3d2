"""Derive (or verify) the CLIP tokenizer files shipped in app/configs/clip-tokenizer/.

No PyPI package ships CLIP's `vocab.json` / `merges.txt`, but `open_clip_torch` (MIT) ships
OpenAI's BPE file `bpe_simple_vocab_16e6.txt.gz`, from which both follow exactly, the way
CLIP's SimpleTokenizer builds its vocabulary: the 256 byte symbols, the same with `</w>`, one
token per merge (lines 1..48894 of the file, after its header line), then `<|startoftext|>`
and `<|endoftext|>`: 49,408 entries. `merges.txt` is those merges under the `#version: 0.2`
header Hugging Face's CLIPTokenizer reads. Both SDXL tokenizers use this vocabulary (the
second one pads with `!`).

    pip download --no-deps open_clip_torch -d /tmp/oc && unzip -o /tmp/oc/*.whl -d /tmp/oc
    python scripts/derive_clip_tokenizer.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz          # verify
    python scripts/derive_clip_tokenizer.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz --write  # rewrite

Verification also tokenizes known prompts ("a photo of a cat" -> 49406 320 1125 539 320 2368 49407).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from app.engine.tiny import bytes_to_unicode  # noqa: E402 - GPT-2/CLIP's byte table, one copy

TARGET = ROOT / "app" / "configs" / "clip-tokenizer"
VOCAB_SIZE = 49_408
MERGES = VOCAB_SIZE - 256 - 256 - 2  # 48,894
KNOWN = {"a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407]}


def derive(bpe_gz: Path) -> tuple[str, str]:
    with gzip.open(bpe_gz, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + MERGES]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise SystemExit(f"derived {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    vocab_text = json.dumps(vocab, ensure_ascii=False, separators=(",", ":")) + "\n"
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    return vocab_text, merges_text


def check_ids() -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(ROOT / "app" / "configs" / "sd15" / "tokenizer")
    for prompt, ids in KNOWN.items():
        got = tokenizer(prompt).input_ids
        if got != ids:
            raise SystemExit(f"{prompt!r} -> {got}, expected {ids}")
    print("known ids: ok")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bpe_gz", type=Path, help="open_clip's bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--write", action="store_true", help="rewrite the shipped files")
    args = parser.parse_args()
    vocab_text, merges_text = derive(args.bpe_gz)
    files = {TARGET / "vocab.json": vocab_text, TARGET / "merges.txt": merges_text}
    if args.write:
        TARGET.mkdir(parents=True, exist_ok=True)
        for path, text in files.items():
            path.write_text(text, encoding="utf-8")
        print(f"wrote {', '.join(str(p.relative_to(ROOT)) for p in files)}")
    else:
        stale = [p.name for p, text in files.items() if p.read_text(encoding="utf-8") != text]
        if stale:
            sys.exit(f"differ from the derivation: {', '.join(stale)}")
        print("vocab.json, merges.txt: identical to the derivation")
    check_ids()


if __name__ == "__main__":
    main()
