"""Every partition kind (iid, dirichlet, pathological, quantity, natural) and their combinations.

Invariants for each kind, with and without patient groups; the skew each kind
is meant to create, measured; the errors that say what to change. The skew
measures are printed (``pytest -s``) as a small table.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from test_partition import _check_cover, _labels, _patients

from shared.config import PARTITION_KINDS as CONFIG_KINDS
from shared.config import SIZE_SKEWS as CONFIG_SKEWS
from shared.config import ConfigError, parse_run_config
from shared.data.partition import PARTITION_KINDS, SIZE_SKEWS, PartitionError, partition_indices
from shared.data.site_sizes import fill_to_targets, site_targets

SITE_NAMES = np.array(["hosp-c", "hosp-a", "hosp-d", "hosp-b"])


def _site_values(groups: np.ndarray | None, n: int, seed: int = 0) -> np.ndarray:
    """A 'site' column: one value per patient (or per image without patients)."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return SITE_NAMES[rng.integers(0, 4, n)]
    _, unit = np.unique(groups, return_inverse=True)
    return SITE_NAMES[rng.integers(0, 4, unit.max() + 1)][unit]


def label_tv(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Label skew: mean over sites of the total-variation distance of its label mix to the global one."""
    classes = np.unique(labels)
    glob = np.array([(labels == c).mean() for c in classes])
    return float(np.mean([0.5 * np.abs(np.array([(labels[p] == c).mean() for c in classes]) - glob).sum()
                          for p in parts]))


def size_cv(parts: list[np.ndarray]) -> float:
    """Size skew: coefficient of variation of the site sizes (0 = equal)."""
    sizes = np.array([len(p) for p in parts], dtype=float)
    return float(sizes.std() / sizes.mean())


# kind, extra kwargs
CASES = [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.5}),
    ("pathological", {"classes_per_site": 2}),
    ("quantity", {}),  # auto = Dirichlet sizes
    ("quantity", {"size_skew": "power-law", "size_exponent": 1.0}),
    ("iid", {"size_skew": "power-law"}),
    ("dirichlet", {"alpha": 0.5, "size_skew": "dirichlet", "size_alpha": 2.0}),
    ("pathological", {"classes_per_site": 2, "size_skew": "power-law", "size_exponent": 0.7}),
]


@pytest.mark.parametrize(("kind", "extra"), CASES, ids=[f"{k}-{'-'.join(map(str, e.values()))}" for k, e in CASES])
@pytest.mark.parametrize("use_groups", [False, True], ids=["images", "patients"])
def test_invariants_every_kind(kind: str, extra: dict, use_groups: bool) -> None:
    y = _labels(900, classes=3)
    g = _patients(len(y)) if use_groups else None
    args = {"alpha": 0.5, "groups": g, "min_partition_size": 10, **extra}
    parts = partition_indices(y, 5, kind, seed=3, **args)
    _check_cover(parts, len(y), 5)  # every sample in exactly one site, sizes add up
    assert min(len(p) for p in parts) >= 10
    if g is not None:  # a patient's images all in one site
        owners = [set(g[p].tolist()) for p in parts]
        assert sum(len(o) for o in owners) == len(set(g.tolist()))
    again = partition_indices(y, 5, kind, seed=3, **args)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_indices(y, 5, kind, seed=4, **args)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


@pytest.mark.parametrize("use_groups", [False, True], ids=["images", "patients"])
def test_natural_reproduces_the_site_column_exactly(use_groups: bool) -> None:
    y = _labels(600)
    g = _patients(600) if use_groups else None
    sites = _site_values(g, 600)
    parts = partition_indices(y, 4, "natural", groups=g, site_values=sites, seed=0)
    _check_cover(parts, 600, 4)
    for p, name in enumerate(sorted(set(sites.tolist()))):  # sorted values: hosp-a is site 0
        np.testing.assert_array_equal(parts[p], np.flatnonzero(sites == name))
    # no randomness: any seed gives the same sites
    assert all(np.array_equal(a, b) for a, b in zip(parts, partition_indices(
        y, 4, "natural", groups=g, site_values=sites, seed=9), strict=True))


def test_natural_errors_name_the_numbers_and_the_fix() -> None:
    y = _labels(200)
    sites = _site_values(None, 200)
    with pytest.raises(PartitionError, match=r"column 'site' has 4 distinct values but the simulation has 3 sites"):
        partition_indices(y, 3, "natural", site_values=sites)
    with pytest.raises(PartitionError, match="--sites 4"):
        partition_indices(y, 5, "natural", site_values=sites)
    with pytest.raises(PartitionError, match="needs each sample's value of column 'hospital'"):
        partition_indices(y, 4, "natural", column="hospital")
    blank = sites.copy()
    blank[[3, 7]] = ""
    with pytest.raises(PartitionError, match="2 of 200 rows have no value in column 'site'"):
        partition_indices(y, 4, "natural", site_values=blank)
    g = np.repeat(np.arange(100), 2).astype(str)  # patient 0 = rows 0, 1
    mixed = np.where(np.arange(200) % 2 == 0, sites, SITE_NAMES[0])
    with pytest.raises(PartitionError, match="patient.* more than one value of column 'site'"):
        partition_indices(y, 4, "natural", site_values=mixed, groups=g)
    few = sites.copy()
    few[:] = "hosp-a"
    few[:5] = "hosp-b"
    with pytest.raises(PartitionError, match=r"site 1 \(partition-id 1\) would get 5 samples < min-partition-size 10"):
        partition_indices(y, 2, "natural", site_values=few)
    with pytest.raises(PartitionError, match="size skew 'dirichlet' cannot be applied"):
        partition_indices(y, 4, "natural", site_values=sites, size_skew="dirichlet")


@pytest.mark.parametrize("use_groups", [False, True], ids=["images", "patients"])
def test_pathological_sites_hold_exactly_k_classes(use_groups: bool) -> None:
    y = _labels(1200, classes=3)
    g = None
    if use_groups:  # single-label patients, so a patient's majority is every image's label
        g = _patients(1200)
        _, unit = np.unique(g, return_inverse=True)
        y = np.random.default_rng(1).integers(0, 3, unit.max() + 1)[unit]
    one = partition_indices(y, 6, "pathological", classes_per_site=1, groups=g, seed=0)
    assert [len(np.unique(y[p])) for p in one] == [1] * 6
    assert sorted({int(np.unique(y[p])[0]) for p in one}) == [0, 1, 2]  # every class has a site
    two = partition_indices(y, 6, "pathological", classes_per_site=2, groups=g, seed=0)
    assert [len(np.unique(y[p])) for p in two] == [2] * 6
    _check_cover(two, len(y), 6)
    full = partition_indices(y, 6, "pathological", classes_per_site=3, groups=g, seed=0)
    assert [len(np.unique(y[p])) for p in full] == [3] * 6
    print(f"\npathological ({'patients' if use_groups else 'images'}): label TV k=1 {label_tv(y, one):.3f}, "
          f"k=2 {label_tv(y, two):.3f}, k=3 {label_tv(y, full):.3f}")
    assert label_tv(y, one) > label_tv(y, two) > label_tv(y, full)


def test_pathological_errors() -> None:
    y = _labels(300, classes=3)
    with pytest.raises(PartitionError, match="classes-per-site 4 exceeds the 3 classes"):
        partition_indices(y, 3, "pathological", classes_per_site=4)
    with pytest.raises(PartitionError, match=r"2 sites x classes-per-site 1 = 2 class slots, but the data has 3"):
        partition_indices(y, 2, "pathological", classes_per_site=1)
    # 4 sites, 3 classes, 1 class each: one class is shared by two sites of ~50 images
    with pytest.raises(PartitionError, match="would get .* < min-partition-size 60.*larger classes-per-site"):
        partition_indices(y, 4, "pathological", classes_per_site=1, min_partition_size=60)


def test_dirichlet_alpha_controls_label_skew() -> None:
    y = _labels(3000, classes=3)
    rows = []
    for alpha in (0.1, 1.0, 100.0):
        tv = np.mean([label_tv(y, partition_indices(y, 6, "dirichlet", alpha=alpha, seed=s)) for s in range(5)])
        rows.append((alpha, tv))
    print("\ndirichlet alpha | mean label TV (5 seeds)")
    for alpha, tv in rows:
        print(f"  {alpha:>6} | {tv:.3f}")
    assert rows[0][1] > 0.3 and rows[2][1] < 0.05
    assert rows[0][1] > rows[1][1] > rows[2][1]


def test_quantity_skews_sizes_keeps_labels_iid() -> None:
    y = _labels(4000)
    print("\npartition | size CV | max/min | label TV")
    results = {}
    for name, kind, extra in (
        ("iid", "iid", {}),
        ("quantity dirichlet a=0.5", "quantity", {"size_alpha": 0.5}),
        ("quantity dirichlet a=100", "quantity", {"size_alpha": 100.0}),
        ("quantity power-law e=1.5", "quantity", {"size_skew": "power-law", "size_exponent": 1.5}),
    ):
        cv, tv, ratio = [], [], []
        for s in range(5):
            parts = partition_indices(y, 6, kind, seed=s, **extra)
            sizes = [len(p) for p in parts]
            cv.append(size_cv(parts))
            ratio.append(max(sizes) / min(sizes))
            tv.append(label_tv(y, [p for p in parts if len(p) >= 200]))  # label mix of the sites large enough to judge
        results[name] = (np.mean(cv), np.mean(ratio), np.mean(tv))
        print(f"  {name:<26} | {np.mean(cv):.3f} | {np.mean(ratio):6.1f} | {np.mean(tv):.3f}")
    assert results["iid"][0] < 0.01
    assert results["quantity dirichlet a=0.5"][0] > 0.4
    assert results["quantity dirichlet a=100"][0] < 0.15
    assert results["quantity power-law e=1.5"][1] > 8  # 6^1.5 = 14.7 before the min-size floor
    assert all(tv < 0.05 for _, _, tv in results.values())  # labels stay iid


def test_power_law_sizes_follow_ranks() -> None:
    targets = site_targets(10_000, 5, "power-law", size_exponent=1.0, min_partition_size=0, seed=2)
    assert targets.sum() == 10_000
    expected = 10_000 * (1 / np.arange(1, 6)) / (1 / np.arange(1, 6)).sum()
    np.testing.assert_allclose(np.sort(targets)[::-1], expected, atol=1)
    equal = site_targets(10_001, 4, "power-law", size_exponent=0.0, seed=2)
    assert sorted(equal.tolist()) == [2500, 2500, 2500, 2501]
    floored = site_targets(1000, 4, "dirichlet", size_alpha=0.05, min_partition_size=50, seed=0)
    assert floored.sum() == 1000 and floored.min() >= 50
    assert np.array_equal(floored, site_targets(1000, 4, "dirichlet", size_alpha=0.05, min_partition_size=50, seed=0))


def test_size_skew_with_label_skew_combines_both() -> None:
    y = _labels(4000, classes=3)
    both = [partition_indices(y, 6, "dirichlet", alpha=0.3, size_skew="power-law", size_exponent=1.5, seed=s)
            for s in range(5)]
    labels_only = [partition_indices(y, 6, "dirichlet", alpha=0.3, seed=s) for s in range(5)]
    sizes_only = [partition_indices(y, 6, "quantity", size_skew="power-law", size_exponent=1.5, seed=s)
                  for s in range(5)]
    row = {name: (np.mean([size_cv(p) for p in runs]), np.mean([label_tv(y, p) for p in runs]))
           for name, runs in (("dirichlet a=0.3", labels_only), ("quantity power-law e=1.5", sizes_only),
                              ("dirichlet a=0.3 + power-law e=1.5", both))}
    print("\ncombination | size CV | label TV")
    for name, (cv, tv) in row.items():
        print(f"  {name:<34} | {cv:.3f} | {tv:.3f}")
    cv_both, tv_both = row["dirichlet a=0.3 + power-law e=1.5"]
    assert cv_both > 0.6 and tv_both > 0.2  # both skews at once
    assert cv_both > row["dirichlet a=0.3"][0] and tv_both > row["quantity power-law e=1.5"][1]


def test_size_skew_with_patients_misses_targets_by_at_most_a_patient() -> None:
    y = _labels(3000)
    g = _patients(3000)
    targets = site_targets(3000, 5, "power-law", size_exponent=1.0, min_partition_size=10, seed=1)
    parts = partition_indices(y, 5, "quantity", size_skew="power-law", size_exponent=1.0, groups=g, seed=1)
    assert np.abs(np.array([len(p) for p in parts]) - targets).max() <= 6  # patients hold 1..6 images


def test_fill_to_targets_gives_every_bin_a_unit_first() -> None:
    owner = fill_to_targets(np.array([5, 1, 1, 1]), [100.0, 1.0, 1.0])
    assert sorted(set(owner.tolist())) == [0, 1, 2]
    assert owner[0] == 0  # the largest unit goes to the largest target


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "quantity", "size_skew": "none"}, "size skew is 'none'"),
        ({"kind": "iid", "size_skew": "power_law"}, "Did you mean 'power-law'"),
        ({"kind": "quantity", "size_alpha": 0.0}, "size_alpha"),
        ({"kind": "quantity", "size_skew": "power-law", "size_exponent": -1.0}, "size_exponent"),
        ({"kind": "pathological", "classes_per_site": 0}, "classes_per_site"),
        ({"kind": "pathologic"}, "Did you mean 'pathological'"),
    ],
)
def test_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(PartitionError, match=match):
        partition_indices(_labels(100), 2, **kwargs)


def test_min_size_error_names_the_site() -> None:
    y = _labels(200)
    g = np.repeat(np.arange(20), 10).astype(str)  # 20 patients of 10 images
    with pytest.raises(PartitionError, match=r"iid partition: site \d \(partition-id \d\) would get \d+ samples < "
                                             r"min-partition-size 25 .*Fix: use fewer partitions"):
        partition_indices(y, 7, "iid", groups=g, min_partition_size=25)


def test_config_keys_and_combinations() -> None:
    assert CONFIG_KINDS == PARTITION_KINDS and CONFIG_SKEWS == SIZE_SKEWS
    cfg = parse_run_config({"partition": "pathological", "classes-per-site": 2, "size-skew": "power-law",
                            "size-exponent": 1.2, "site-shift": True})
    p = cfg.partition
    assert (p.kind, p.classes_per_site, p.size_skew, p.size_exponent) == ("pathological", 2, "power-law", 1.2)
    assert (cfg.data.min_train_images, cfg.data.min_val_images) == (20, 10)
    bad = [
        ({"partition": "pathological", "classes-per-site": 3}, "classes-per-site=3 but task 'pneumonia-cxr' has 2"),
        ({"partition": "pathological", "task": "lung-seg"}, "segmentation task"),
        ({"partition": "natural"}, "data-path is ''"),
        ({"partition": "natural", "data-path": "/x.csv", "partition-column": " "}, "needs 'partition-column'"),
        ({"partition": "natural", "data-path": "/x.csv", "size-skew": "power-law"}, "cannot apply on top"),
        ({"partition": "quantity", "size-skew": "none"}, "that is partition='iid'"),
        ({"size-skew": "zipf"}, "'size-skew'"),
        ({"partition": "quantiy"}, "Did you mean 'quantity'"),
        ({"classes-per-sites": 2}, "Did you mean 'classes-per-site'"),
        ({"min-train-image": 5}, "Did you mean 'min-train-images'"),
        ({"size-alpha": 0}, "'size-alpha'"),
    ]
    for flat, match in bad:
        with pytest.raises(ConfigError, match=match):
            parse_run_config(flat)


def test_partitioning_never_imports_flower() -> None:
    code = ("import sys, shared.data.partition, shared.data.site_sizes, shared.site_data; "
            "sys.exit(1 if 'flwr' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
