"""FairFace's attribute classes and the group mappings the study aggregates them into.

Classifiers predict raw classes (FairFace: race 7 or 4, gender 2, age 9 bins); the study
reports coarser groups. A mapping assigns every raw class to exactly one group, so no
prediction is dropped. An image is put in the group of its most probable raw class; its
confidence is the summed probability of that group's classes.

Mappings:

| name | groups | raw classes per group |
|---|---|---|
| `gender` | Male, Female | identity |
| `race7` | FairFace's 7 races | identity |
| `race4` | White, Black, Asian, Other | East and Southeast Asian → Asian; Indian, Latino_Hispanic, Middle Eastern → Other (from the 4-race model: Indian → Other) |
| `race2` | White, Black, Other | every race but White and Black → Other, so shares sum to 1 and White/Black keep their share of all images |
| `age9` | FairFace's 9 bins | identity |
| `age3` | 0-9, 10-49, 50+ | 0-2, 3-9 / 10-19 … 40-49 / 50-59, 60-69, 70+ |
| `age2` | 10-49, other | the split behind the study's age ratio |
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from biasprune.classifier import UNKNOWN

RACE7 = ["White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern"]
"""Race classes of FairFace's 7-race model and label CSVs, in the model's output order."""
RACE4 = ["White", "Black", "Asian", "Indian"]
"""Race classes of FairFace's 4-race model, in its output order."""
GENDER = ["Male", "Female"]
AGE9 = ["0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+"]
"""Age bins of FairFace, in the model's output order; the label CSVs spell the last one `more than 70`."""

AGE_CSV_ALIASES = {"more than 70": "70+"}
AGE_BIN_LOWER = [0, 3, 10, 20, 30, 40, 50, 60, 70]
"""Lower bound in years of each bin of `AGE9`."""


@dataclass(frozen=True)
class GroupMapping:
    """Maps the raw classes of one attribute onto reported groups.

    Attributes:
        name: Mapping name (`age3`, `race2`, ...).
        attribute: The raw attribute it reads (`gender`, `race`, `age`).
        raw_classes: The raw classes, in the classifier's output order.
        groups: Group names, in report order.
        group_of: Group index of each raw class.
    """

    name: str
    attribute: str
    raw_classes: tuple[str, ...]
    groups: tuple[str, ...]
    group_of: tuple[int, ...]

    def map_labels(self, raw: np.ndarray) -> np.ndarray:
        """Map raw class indices to group indices; `UNKNOWN` stays `UNKNOWN`."""
        raw = np.asarray(raw, dtype=np.int64)
        table = np.asarray(self.group_of, dtype=np.int64)
        out = np.full(raw.shape, UNKNOWN, dtype=np.int64)
        known = raw != UNKNOWN
        if np.any((raw[known] < 0) | (raw[known] >= len(table))):
            raise ValueError(f"{self.name}: raw class index out of range 0..{len(table) - 1}")
        out[known] = table[raw[known]]
        return out

    def map_names(self, names: list[str]) -> np.ndarray:
        """Map raw class names (as in FairFace's label CSVs) to group indices."""
        index = {name: i for i, name in enumerate(self.raw_classes)}
        raw = []
        for name in names:
            name = AGE_CSV_ALIASES.get(str(name).strip(), str(name).strip())
            if name not in index:
                raise ValueError(
                    f"unknown {self.attribute} label {name!r}; expected one of {list(self.raw_classes)}"
                )
            raw.append(index[name])
        return self.map_labels(np.asarray(raw, dtype=np.int64))

    def map_probabilities(self, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (group index, group confidence) from raw class probabilities of shape (N, classes).

        The group is that of the most probable raw class; the confidence is the summed
        probability of the raw classes in that group.
        """
        probabilities = np.asarray(probabilities, dtype=np.float64)
        if probabilities.ndim != 2 or probabilities.shape[1] != len(self.raw_classes):
            raise ValueError(
                f"{self.name}: expected probabilities of shape (N, {len(self.raw_classes)}), got {probabilities.shape}"
            )
        labels = self.map_labels(probabilities.argmax(axis=1))
        summed = np.zeros((len(probabilities), len(self.groups)))
        for raw_index, group in enumerate(self.group_of):
            summed[:, group] += probabilities[:, raw_index]
        confidence = summed[np.arange(len(labels)), labels] if len(labels) else np.zeros(0)
        return labels, confidence


def _mapping(name: str, attribute: str, raw: list[str], groups: dict[str, list[str]]) -> GroupMapping:
    group_names = list(groups)
    group_of = []
    for cls in raw:
        owners = [g for g, members in groups.items() if cls in members]
        if len(owners) != 1:
            raise AssertionError(f"{name}: raw class {cls!r} is in {len(owners)} groups")
        group_of.append(group_names.index(owners[0]))
    return GroupMapping(name, attribute, tuple(raw), tuple(group_names), tuple(group_of))


def _identity(name: str, attribute: str, raw: list[str]) -> GroupMapping:
    return _mapping(name, attribute, raw, {c: [c] for c in raw})


_AGE3 = {"0-9": ["0-2", "3-9"], "10-49": ["10-19", "20-29", "30-39", "40-49"], "50+": ["50-59", "60-69", "70+"]}
_AGE2 = {"10-49": _AGE3["10-49"], "other": _AGE3["0-9"] + _AGE3["50+"]}


def mapping(name: str, race_classes: int = 7) -> GroupMapping:
    """Return the named group mapping.

    Args:
        name: One of `MAPPINGS`.
        race_classes: Race classes of the classifier, 7 or 4 (FairFace's two models).

    Raises:
        ValueError: Unknown name, or `race7` asked of a 4-race classifier.
    """
    if race_classes not in (4, 7):
        raise ValueError(f"race_classes must be 7 or 4 (FairFace's two models), got {race_classes}")
    race = RACE7 if race_classes == 7 else RACE4
    if name == "gender":
        return _identity("gender", "gender", GENDER)
    if name == "age9":
        return _identity("age9", "age", AGE9)
    if name == "age3":
        return _mapping("age3", "age", AGE9, _AGE3)
    if name == "age2":
        return _mapping("age2", "age", AGE9, _AGE2)
    if name == "race7":
        if race_classes != 7:
            raise ValueError("mapping race7 needs the 7-race classifier; use race4 or race2 with the 4-race model")
        return _identity("race7", "race", RACE7)
    if name == "race4":
        asian = ["East Asian", "Southeast Asian"] if race_classes == 7 else ["Asian"]
        other = [c for c in race if c not in ("White", "Black", *asian)]
        return _mapping("race4", "race", race, {"White": ["White"], "Black": ["Black"], "Asian": asian, "Other": other})
    if name == "race2":
        other = [c for c in race if c not in ("White", "Black")]
        return _mapping("race2", "race", race, {"White": ["White"], "Black": ["Black"], "Other": other})
    raise ValueError(f"unknown group mapping {name!r}; choose one of {list(MAPPINGS)}")


MAPPINGS = ("gender", "race7", "race4", "race2", "age9", "age3", "age2")
ATTRIBUTE_OF = {"gender": "gender", "race7": "race", "race4": "race", "race2": "race", "age9": "age", "age3": "age", "age2": "age"}

STUDY_RATIOS = {
    "gender": (["Male"], ["Female"]),
    "race": (["White"], ["Black"]),
    "age": (["10-49"], None),
}
"""The study's ratios male/female, white/black and age 10-49 / others, as world study ratios."""


def age_bin(years: np.ndarray) -> np.ndarray:
    """Return the `AGE9` bin index of each age in years (negative ages raise)."""
    years = np.asarray(years, dtype=np.float64)
    if np.any(years < 0):
        raise ValueError("ages must be non-negative")
    return np.searchsorted(np.asarray(AGE_BIN_LOWER), years, side="right") - 1


def study_ratios(mappings: dict[str, GroupMapping]) -> dict[str, tuple[list[str], list[str] | None]]:
    """Return the study ratios that the configured mappings can express."""
    ratios = {}
    for attribute, (numerator, denominator) in STUDY_RATIOS.items():
        m = mappings.get(attribute)
        if m is None:
            continue
        needed = numerator + (denominator or [])
        if all(g in m.groups for g in needed):
            ratios[attribute] = (numerator, denominator)
    return ratios
