"""Seeded fuzzing of the safetensors header parser: every mutant is parsed or refused with HeaderError, fast.

Mutants of an SD-shaped single-file header (byte flips, insertions, deletions,
truncations, wrong length prefixes, and structural edits that put hostile values
into dtype, shape, data_offsets and __metadata__: lists, objects, huge integers,
huge shape products, 100,000-deep nesting, lone surrogates, duplicate keys).
A header the parser accepts must also re-encode (apply writes it back).
"""

from __future__ import annotations

import json
import random
import time

from nemo_surgery.surgery.safetensors_file import HeaderError, encode_header, parse_header

SEED = 20261125
MUTANTS = 3000
#: Per-header budget: a typical mutant parses in about a millisecond; the slowest (300 KB headers holding a
#: 100,000-element list) take tens of ms on 2 busy cores. Before the bounds, huge shape products took seconds.
MAX_SECONDS = 0.5


def _base_header() -> tuple[dict, int]:
    """An SD 1.x-like LDM header (value/key weights of 16 attention layers, conv_in, EMA copies), data length."""
    entries: list[tuple[str, str, list[int]]] = [("model.diffusion_model.input_blocks.0.0.weight", "F16", [320, 4, 3, 3])]
    for i, rows in enumerate([320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280]):
        for part in ("to_k", "to_v"):
            entries.append((f"model.diffusion_model.block{i}.1.transformer_blocks.0.attn2.{part}.weight", "F16", [rows, 768]))
        entries.append((f"model_ema.diffusion_modelblock{i}1transformer_blocks0attn2to_vweight", "F16", [rows, 768]))
    entries.append(("cond_stage_model.transformer.text_model.embeddings.position_ids", "I64", [1, 77]))
    doc: dict = {"__metadata__": {"format": "pt", "modelspec.hash_sha256": "0x" + "ab" * 32}}
    pos = 0
    size = {"F16": 2, "I64": 8}
    for name, dtype, shape in entries:
        n = size[dtype]
        for d in shape:
            n *= d
        doc[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    return doc, pos


HOSTILE = [
    ["F32"], {"F32": 1}, None, True, 1.5, -1, "F32 ", "", 10**4000, -(10**30), 2**63, [2**62] * 32,
    [10**18] * 4, [1] * 100_000, [[1, 2]], ["1"], [True, 2], {"a": [1]}, "\ud800", [0, 2**70], [5, 1], [0], [0, 0, 0],
]


def _structural(rng: random.Random, doc: dict) -> str:
    doc = json.loads(json.dumps(doc))
    names = [k for k in doc if k != "__metadata__"]
    choice = rng.randrange(9)
    if choice == 0:  # hostile value in a tensor field
        entry = doc[rng.choice(names)]
        entry[rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(HOSTILE)
    elif choice == 1:  # hostile metadata
        doc["__metadata__"][rng.choice(["format", "x", "\ud800"])] = rng.choice(HOSTILE + ["ok"])
    elif choice == 2:  # an entry that is not an object
        doc[rng.choice(names)] = rng.choice(HOSTILE)
    elif choice == 3:  # drop a field
        entry = doc[rng.choice(names)]
        entry.pop(rng.choice(["dtype", "shape", "data_offsets"]))
    elif choice == 4:  # shift offsets: overlaps and gaps
        entry = doc[rng.choice(names)]
        a, b = entry["data_offsets"]
        delta = rng.choice([-2, -1, 1, 2, 1 << 40])
        entry["data_offsets"] = [a + delta, b + delta] if rng.random() < 0.5 else [a, b + delta]
    elif choice == 5:  # metadata not an object
        doc["__metadata__"] = rng.choice(HOSTILE)
    elif choice == 6:  # huge shape with a matching huge span
        entry = doc[rng.choice(names)]
        entry["shape"] = [rng.randrange(1, 1 << 40) for _ in range(rng.randrange(1, 33))]
    elif choice == 7:  # deep nesting (textual: json.dumps would recurse)
        text = json.dumps(doc)
        depth = rng.choice([1000, 100_000])
        return text.replace('"shape": ', '"shape": ' + "[" * depth + "]" * depth + ", \"x\": ", 1)
    else:  # duplicate key (textual)
        text = json.dumps(doc)
        name = rng.choice(names)
        dup = json.dumps({name: doc[name]})[1:-1]
        return text[:-1] + ", " + dup + "}"
    return json.dumps(doc, ensure_ascii=rng.random() < 0.5)


def _bytes_mutant(rng: random.Random, body: bytes) -> bytes:
    data = bytearray(body)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(5)
        at = rng.randrange(len(data)) if data else 0
        if op == 0 and data:
            data[at] = rng.randrange(256)
        elif op == 1:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
        elif op == 2:
            del data[at : at + rng.randrange(1, 64)]
        elif op == 3:
            data[at:at] = data[rng.randrange(len(data)) :][: rng.randrange(1, 200)]
        else:
            data = data[: rng.randrange(len(data) + 1)]
    return bytes(data)


def _mutant(rng: random.Random, doc: dict, data_len: int) -> tuple[bytes, bytes, int]:
    kind = rng.random()
    text = json.dumps(doc).encode()
    if kind < 0.45:
        body = _structural(rng, doc).encode("utf-8", "surrogatepass")
    elif kind < 0.9:
        body = _bytes_mutant(rng, text)
    else:
        body = text
    length = len(body)
    if rng.random() < 0.1:
        length = rng.choice([0, 1, len(body) - 1, len(body) + 1, 2**63, rng.randrange(2**64)])
    size = 8 + len(body) + data_len
    if rng.random() < 0.1:
        size += rng.choice([-1, 1, -data_len, 1 << 40])
    return length.to_bytes(8, "little"), body, size


def test_fuzzed_headers_give_header_errors_in_milliseconds() -> None:
    rng = random.Random(SEED)
    doc, data_len = _base_header()
    accepted = refused = 0
    slowest = 0.0
    failures: list[str] = []
    start = time.perf_counter()
    for i in range(MUTANTS):
        prefix, body, size = _mutant(rng, doc, data_len)
        n = int.from_bytes(prefix, "little")
        t0 = time.perf_counter()
        try:
            header = parse_header(prefix, body[:n] if n <= len(body) else body, size, f"mutant{i}")
            encode_header(header, header.metadata)
            accepted += 1
        except HeaderError:
            refused += 1
        except Exception as exc:  # anything else is the defect this test exists for
            failures.append(f"mutant {i}: {type(exc).__name__}: {str(exc)[:120]}")
        slowest = max(slowest, time.perf_counter() - t0)
    total = time.perf_counter() - start
    print(f"{MUTANTS} mutants: {refused} refused, {accepted} accepted, {total:.2f} s, slowest {slowest * 1000:.1f} ms")
    assert not failures, failures[:10]
    assert refused > MUTANTS // 2 and accepted > 0, "the mutants exercise both outcomes"
    assert slowest < MAX_SECONDS, f"slowest header took {slowest:.3f} s"
