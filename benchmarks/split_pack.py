"""Split a packed token file into N files of about equal size, for transfers of at most 64 MiB each.

    PYTHONPATH=src python benchmarks/split_pack.py FILE.safetensors N

Chunk i of every source goes to part i % N, written as FILE.partK.safetensors with the same header
(tokenizer, chunk_len, split, seed, held-out fraction) and each source's chunk count updated, so every
part is a data spec of its own and `spotlight train --data part0 part1 ... --chunks C` reads them all.
"""

import sys
from pathlib import Path

from safetensors.torch import load_file

from spotlight_attn.data.packed import read_header, write_packed


def main(path: str, parts: int) -> None:
    header, tensors = read_header(path), load_file(path)
    for k in range(parts):
        part = {name: chunks[k::parts] for name, chunks in tensors.items()}
        head = {key: value for key, value in header.items() if key not in ("format", "version")}
        head["sources"] = [dict(s, chunks=int(part[s["name"]].shape[0])) for s in header["sources"]]
        out = Path(path).with_suffix(f".part{k}.safetensors")
        write_packed(out, part, head)
        print(f"{out}: {sum(int(t.shape[0]) for t in part.values())} chunks, {out.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
