"""The neuron set: which rows of which value layers to zero, as versioned JSON.

Format (``format`` = ``nemo-surgery.neuron-set``, ``version`` = 1)::

    {
      "format": "nemo-surgery.neuron-set",
      "version": 1,
      "tool_version": "0.1.0",
      "model": {"fingerprint": "<sha256>", "source": "<path or hub id>",
                "weights_fingerprint": "wfp1:<sha256>"},  # byte-level, see docs/apply.md
      "settings": {...},                      # scan settings, free-form
      "prompts": [{"index": 0, "prompt": "...", "memorized": true,
                   "mitigated": true, "neurons": 3}, ...],
      "layers": [
        {"id": "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
         "ldm_id": "input_blocks.1.1.transformer_blocks.0.attn2.to_v",
         "rows": 320, "cols": 768,
         "neurons": [12, 97],                 # sorted row indices
         "needed_by": [[0], [0, 4]]}          # prompt indices per neuron
      ],
      "total_neurons": 2
    }

Only ``version``, ``layers[].id``, ``rows``, ``cols`` and ``neurons`` are required
to apply a set; the rest is provenance. Layers with no neuron may be omitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_surgery import __version__
from nemo_surgery.atomic import write_json
from nemo_surgery.errors import InputError
from nemo_surgery.keymap import SD_LAYERS_PER_BLOCK, diffusers_to_ldm, is_value_layer_id
from nemo_surgery.provenance import check_envelope, envelope
from nemo_surgery.schema import Bool, Int, ListOf, Nullable, Obj, Str, check_document, read_json

FORMAT = "nemo-surgery.neuron-set"
VERSION = 1


@dataclass
class LayerNeurons:
    """The neurons (row indices) chosen in one value layer."""

    id: str
    rows: int
    cols: int
    neurons: list[int]
    needed_by: list[list[int]] = field(default_factory=list)
    ldm_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form of this layer entry."""
        out: dict[str, Any] = {"id": self.id}
        if self.ldm_id:
            out["ldm_id"] = self.ldm_id
        out.update(rows=self.rows, cols=self.cols, neurons=list(self.neurons))
        if self.needed_by:
            out["needed_by"] = [list(p) for p in self.needed_by]
        return out


@dataclass
class NeuronSet:
    """A merged set of neurons to block, with its provenance."""

    layers: list[LayerNeurons]
    fingerprint: str | None = None
    source: str | None = None
    weights_fingerprint: str | None = None  # surgery.fingerprint of the stored weights; apply checks it
    settings: dict[str, Any] = field(default_factory=dict)
    prompts: list[dict[str, Any]] = field(default_factory=list)
    tool_version: str = __version__

    @property
    def total(self) -> int:
        """Number of neurons over all layers."""
        return sum(len(layer.neurons) for layer in self.layers)

    def by_id(self) -> dict[str, LayerNeurons]:
        """Return the layers keyed by id."""
        return {layer.id: layer for layer in self.layers}

    def nonempty(self) -> list[LayerNeurons]:
        """Return the layers that hold at least one neuron."""
        return [layer for layer in self.layers if layer.neurons]

    def to_json(self) -> dict[str, Any]:
        """Return the versioned JSON document."""
        return {
            **envelope(FORMAT, VERSION),
            "tool_version": self.tool_version,
            "model": {"fingerprint": self.fingerprint, "source": self.source,
                      "weights_fingerprint": self.weights_fingerprint},
            "settings": self.settings,
            "prompts": self.prompts,
            "layers": [layer.to_json() for layer in self.layers],
            "total_neurons": self.total,
        }

    def save(self, path: str | Path) -> Path:
        """Write the set atomically as JSON."""
        return write_json(path, self.to_json())


def _fail(path: Path, what: str) -> InputError:
    return InputError(f"{path}: not a valid neuron set ({what}); {HINT}")


HINT = "produce one with `nemo-surgery scan`"

#: The neuron-set document's shape; semantic checks (ids, ranges, duplicates) follow in parse_neuron_set.
SCHEMA = Obj(
    required={
        "version": Int(),
        "layers": ListOf(
            Obj(
                required={"id": Str(), "rows": Int(1), "cols": Int(1), "neurons": ListOf(Int(0))},
                optional={"ldm_id": Nullable(Str()), "needed_by": Nullable(ListOf(ListOf(Int(0))))},
            )
        ),
    },
    optional={
        "format": Str(),
        "tool_version": Nullable(Str()),
        "model": Nullable(Obj(optional={"fingerprint": Nullable(Str()), "source": Nullable(Str()),
                                        "weights_fingerprint": Nullable(Str())})),
        "settings": Nullable(Obj()),
        "prompts": Nullable(ListOf(Obj(optional={"index": Int(0), "prompt": Str(), "memorized": Bool(), "mitigated": Nullable(Bool())}))),
        "total_neurons": Int(0),
    },
)


def parse_neuron_set(doc: Any, path: Path = Path("<neuron set>")) -> NeuronSet:
    """Validate a decoded JSON document (envelope, then :data:`SCHEMA`) and return the NeuronSet it describes."""
    check_envelope(doc, FORMAT, VERSION, path, HINT)
    check_document(doc, SCHEMA, path, "neuron set", HINT)
    layers: list[LayerNeurons] = []
    seen: set[str] = set()
    for i, entry in enumerate(doc["layers"]):
        lid = entry["id"]
        if not is_value_layer_id(lid):
            raise _fail(path, f"layers[{i}].id {lid!r} is not a cross-attention value layer id")
        if lid in seen:
            raise _fail(path, f"layer {lid} listed twice")
        seen.add(lid)
        rows, neurons = entry["rows"], entry["neurons"]
        if len(set(neurons)) != len(neurons):
            raise _fail(path, f"layer {lid}: duplicate neuron indices")
        bad = [n for n in neurons if n >= rows]
        if bad:
            raise _fail(path, f"layer {lid}: neuron index {bad[0]} out of range 0..{rows - 1}")
        needed_by = entry.get("needed_by") or []
        if needed_by and len(needed_by) != len(neurons):
            raise _fail(path, f"layers[{i}].needed_by has {len(needed_by)} entries for {len(neurons)} neurons")
        order = sorted(range(len(neurons)), key=neurons.__getitem__)
        ldm_id = entry.get("ldm_id")
        layers.append(
            LayerNeurons(
                id=lid,
                rows=rows,
                cols=entry["cols"],
                neurons=[neurons[k] for k in order],
                needed_by=[list(needed_by[k]) for k in order] if needed_by else [],
                ldm_id=ldm_id if ldm_id is not None else diffusers_to_ldm(lid, SD_LAYERS_PER_BLOCK),
            )
        )
    model = doc.get("model") or {}
    return NeuronSet(
        layers=layers,
        fingerprint=model.get("fingerprint"),
        source=model.get("source"),
        weights_fingerprint=model.get("weights_fingerprint"),
        settings=doc.get("settings") or {},
        prompts=doc.get("prompts") or [],
        tool_version=doc.get("tool_version") or "unknown",
    )


def load_neuron_set(path: str | Path) -> NeuronSet:
    """Read and validate a neuron-set JSON file; raise InputError with one line on failure."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: neuron set not found; {HINT}")
    return parse_neuron_set(read_json(path, "neuron set", HINT), path)
