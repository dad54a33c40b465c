"""Add the key llama.cpp's DeepSeek loader requires and its converter leaves out.

    python docs/gguf_q_lora_rank.py model.raw.gguf model.gguf

llama.cpp's convert_hf_to_gguf.py writes deepseek2.attention.q_lora_rank only when config.json's
q_lora_rank is set; for a full-rank query (null, what convert.py writes by default) the key is
missing and llama.cpp refuses the file ("key not found in model: deepseek2.attention.q_lora_rank").
Its loader reads 0 as "no q_lora path" (a plain attn_q). This copies the file with the key = 0,
through the gguf package's own metadata tool; a file that has the key, or is not deepseek2, is
copied as it is. The input is never changed; the output appears whole or not at all.
"""
import os
import shutil
import sys
from pathlib import Path

import gguf
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata


def add_q_lora_rank(src: Path, dst: Path) -> bool:
    """Copy src to dst with deepseek2.attention.q_lora_rank = 0 where it is missing; True if added."""
    reader = gguf.GGUFReader(src, "r")
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    key = gguf.Keys.Attention.Q_LORA_RANK.format(arch=arch)
    tmp = dst.with_name(f".{dst.name}.partial")
    added = arch == "deepseek2" and key not in reader.fields
    try:
        if added:
            writer = gguf.GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
            copy_with_new_metadata(reader, writer, {key: MetadataDetails(gguf.GGUFValueType.UINT32, 0)}, [])
        else:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return added


if __name__ == "__main__":
    if len(sys.argv) != 3 or Path(sys.argv[1]).resolve() == Path(sys.argv[2]).resolve():
        sys.exit("usage: python docs/gguf_q_lora_rank.py IN.gguf OUT.gguf (two different files)")
    try:
        print("added deepseek2.attention.q_lora_rank = 0" if add_q_lora_rank(Path(sys.argv[1]), Path(sys.argv[2]))
              else "copied unchanged (the key is there, or the model is not deepseek2)")
    except (OSError, KeyError, ValueError) as e:
        sys.exit(f"{sys.argv[1]}: not a GGUF file this can read ({e})")
