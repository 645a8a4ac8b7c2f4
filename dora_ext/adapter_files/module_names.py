"""Module names in kohya-style adapter files, both ways.

A file names a module `<prefix>_<path with "." → "_">` (LyCORIS, kohya sd-scripts, OneTrainer's "legacy_diffusers"
output, ai-toolkit) or `<prefix>.<path>` (OneTrainer's "diffusers" output). The prefixes are the tools' own:
`lycoris` (lycoris/wrapper.py LycorisNetwork.LORA_PREFIX), `lora_unet`, `lora_te`, and `lora_te1` / `lora_te2` for
SDXL's two text encoders (lycoris/kohya.py LORA_PREFIX_UNET, LORA_PREFIX_TEXT_ENCODER + index). Underscores in the
module path itself make the kohya name lossy, so reading builds the table of the model's own module names and maps
each file name back through it: a name no module has, or one that two modules share, is an error naming it.

`prefixes` maps each file prefix to the submodule (a path in the model, "" for the model itself) its names are
relative to, e.g. {"lora_unet": "unet", "lora_te": "text_encoder"} for a container holding both. The default maps
every known prefix to the model itself, which is right for a file holding one of them.
"""

from __future__ import annotations

from torch import nn

from ..layers import DoRALayer

__all__ = ["KNOWN_PREFIXES", "NameTable", "file_names"]

KNOWN_PREFIXES = ("lycoris", "lora_unet", "lora_te", "lora_te1", "lora_te2")


def _modules_under(root: nn.Module, subpath: str, what: str) -> dict[str, str]:
    """{path relative to `subpath`: full path} of the modules under it, not descending into dora_ext layers (their
    base_layer and adapter containers are not the model's modules)."""
    try:
        sub = root.get_submodule(subpath)
    except AttributeError as exc:
        raise ValueError(f"{what}: prefixes maps to {subpath!r}, which is not a submodule of the model") from exc
    out, wrapped = {}, []
    for rel, mod in sub.named_modules():
        if not rel or any(rel.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(mod, DoRALayer):
            wrapped.append(rel)
        out[rel] = f"{subpath}.{rel}" if subpath else rel
    return out


class NameTable:
    """File module names → the model's module paths, for one model and one prefixes mapping."""

    def __init__(self, root: nn.Module, prefixes: dict[str, str] | None, what: str):
        self.root, self.what = root, what
        self.explicit = prefixes is not None
        self.prefixes = dict(prefixes) if prefixes is not None else {p: "" for p in KNOWN_PREFIXES}
        self._tables: dict[str, tuple[dict[str, str], dict[str, list[str]]]] = {}

    def _table(self, prefix: str) -> tuple[dict[str, str], dict[str, list[str]]]:
        """({dotted relative path: full path}, {underscored relative path: [full paths]}) under `prefix`."""
        if prefix not in self._tables:
            dotted = _modules_under(self.root, self.prefixes[prefix], self.what)
            underscored: dict[str, list[str]] = {}
            for rel, full in dotted.items():
                underscored.setdefault(rel.replace(".", "_"), []).append(full)
            self._tables[prefix] = (dotted, underscored)
        return self._tables[prefix]

    def resolve(self, names: list[str]) -> dict[str, str]:
        """{file name: module path} for every name; one error naming all unmatched and ambiguous names."""
        used = sorted({p for name in names for p in self.prefixes if name.startswith((p + "_", p + "."))})
        if not self.explicit and len(used) > 1:
            raise ValueError(f"{self.what}: the file holds modules under the prefixes {used}, which belong to "
                             "different models; pass prefixes={prefix: submodule path} for a model holding them "
                             "all, e.g. prefixes={'lora_unet': 'unet', 'lora_te': 'text_encoder'}")
        out, unmatched, ambiguous = {}, [], []
        for name in names:
            found = set()
            for prefix in self.prefixes:
                rel = name[len(prefix) + 1:]
                if name.startswith(prefix + "."):
                    dotted = self._table(prefix)[0]
                    found.update([dotted[rel]] if rel in dotted else [])
                elif name.startswith(prefix + "_"):
                    found.update(self._table(prefix)[1].get(rel, []))
            if len(found) == 1:
                out[name] = found.pop()
            elif found:
                ambiguous.append(f"{name} (modules {sorted(found)})")
            else:
                unmatched.append(name)
        if unmatched or ambiguous:
            parts = []
            if unmatched:
                parts.append(f"{len(unmatched)} name(s) no module of the model has: {unmatched[:5]}")
            if ambiguous:
                parts.append(f"{len(ambiguous)} name(s) two modules share once '.' becomes '_': {ambiguous[:5]}")
            raise ValueError(f"{self.what}: {'; '.join(parts)} (prefixes: {self.prefixes})")
        return out


def file_names(paths: list[str], prefixes: dict[str, str], what: str) -> dict[str, str]:
    """{module path: kohya file name} under `prefixes` ({prefix: submodule path}; each path takes the prefix of the
    longest submodule that holds it); refuses paths no prefix covers and two paths that would get one name."""
    out, uncovered = {}, []
    for path in paths:
        holders = [(sub, p) for p, sub in prefixes.items() if sub == "" or path == sub or path.startswith(sub + ".")]
        if not holders:
            uncovered.append(path)
            continue
        sub, prefix = max(holders, key=lambda h: len(h[0]))
        rel = path[len(sub) + 1:] if sub else path
        out[path] = f"{prefix}_{rel.replace('.', '_')}"
    if uncovered:
        raise ValueError(f"{what}: no prefix covers the module(s) {uncovered[:5]} (prefixes: {prefixes})")
    by_name: dict[str, list[str]] = {}
    for path, name in out.items():
        by_name.setdefault(name, []).append(path)
    clashes = {name: ps for name, ps in by_name.items() if len(ps) > 1}
    if clashes:
        raise ValueError(f"{what}: modules whose kohya names coincide ('.' → '_'): {clashes}; a file cannot tell "
                         "them apart")
    return out
