"""The generator's IDP catalogue: the real aseg and DK IDPs it draws, their kinds and typical adult values."""

from __future__ import annotations

from normdiff_bids.data.atlases import ASEG_LABELS, DK_REGIONS, HEMISPHERES
from normdiff_bids.data.synthetic.resources import table_rows

#: Typical adult aseg volumes (mm^3), roughly those of healthy adults in FreeSurfer 7 (``aseg_typical.tsv``).
#: Structures that FreeSurfer reports as (nearly) always zero are left out of the generator.
ASEG_TYPICAL: dict[str, float] = {row["structure"]: float(row["volume_mm3"])
                                  for row in table_rows("aseg_typical.tsv")}
#: aseg structures whose volume is fluid or lesion: log-normal, growing steeply with age.
ASEG_FLUID: frozenset[str] = frozenset(row["structure"] for row in table_rows("aseg_typical.tsv")
                                       if row["kind"] == "fluid")
#: Typical adult DK values per hemisphere: (mean thickness mm, white-surface area mm^2) (``dk_typical.tsv``).
#: Grey-matter volume is close to area x thickness, which is how the generator sets it.
DK_TYPICAL: dict[str, tuple[float, float]] = {
    row["region"]: (float(row["thickness_mm"]), float(row["area_mm2"]))
    for row in table_rows("dk_typical.tsv")
}
#: DK regions listed first (by ``listed_first``), so that small cohorts get the regions people look at first.
DK_FIRST: tuple[str, ...] = tuple(
    row["region"] for row in sorted((r for r in table_rows("dk_typical.tsv") if r["listed_first"] != "n/a"),
                                    key=lambda r: int(r["listed_first"])))


def candidate_idps() -> list[tuple[str, str]]:
    """(name, kind) for every real IDP the generator can use, interleaving aseg/thickness/area/volume."""
    unknown = sorted(set(ASEG_TYPICAL) - set(ASEG_LABELS))
    if unknown:
        raise ValueError(f"tables/aseg_typical.tsv names structures unknown to data/atlases.py: {unknown}")
    aseg = [(n, "fluid" if n in ASEG_FLUID else "subcortical") for n in ASEG_TYPICAL]
    regions = list(DK_FIRST) + [r for r in DK_REGIONS if r not in DK_FIRST]
    pools = [aseg]
    for measure in ("thickness", "area", "volume"):
        pools.append([(f"{h}_{r}_{measure}", measure) for r in regions for h in HEMISPHERES])
    out: list[tuple[str, str]] = []
    for i in range(max(len(p) for p in pools)):
        out.extend(p[i] for p in pools if i < len(p))
    return out


def real_idp_names() -> list[str]:
    """Every IDP the generator can write into FreeSurfer files (aseg volumes, DK thickness/area/volume)."""
    return [name for name, _ in candidate_idps()]


def homolog_key(name: str) -> str:
    """The name without its hemisphere, so left and right copies of a structure share a factor."""
    for prefix in ("Left-", "Right-", "lh_", "rh_"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def strip_repeat(name: str) -> str:
    """``lh_x_thickness_2`` -> ``lh_x_thickness`` (names past the real catalogue carry a repeat suffix)."""
    head, _, tail = name.rpartition("_")
    return head if head and tail.isdigit() else name
