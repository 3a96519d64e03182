"""Across datasets: which IMA reading no other model dominates, read from the ``ablation.json``
of several ``nnunet-ima ablation`` workdirs (one per dataset).

Each workdir's report holds, per case set and model, the means over the seeds of clean TVDI and
TVDI AUC and the models that dominate it within the intervals (``dominated_by``, computed by
:func:`nnunet_ima.nnunet.ablation.collect_statistics`: a clean, Adv, baseline or fine-tuned model
at least as good on both means and significantly better on one). This module puts them side by
side, one column per dataset, counts for every model the datasets where nothing dominates it
(*undominated*), and names the default by the evidence: the IMA reading undominated on the most
datasets.

Ties are broken by the mean rank of TVDI AUC among the tied readings over the datasets that hold
all of them (rank 1 the highest mean, equal means sharing the better rank), then by the mean
rank of clean TVDI, then by name; the line says when a tie was broken and how.

The choice is made on one case set, the validation cases by default: choosing on the test cases
would make their numbers, the held-out evidence for the choice, part of the choice. The other
case set is tabulated beside it for the same models, and chooses nothing. Reads files only;
trains and evaluates nothing.
"""
from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import MISSING, dataclass, fields
from typing import Dict, List, Optional, Sequence, Tuple

from nnunet_ima.declared import (Choice, InvalidSetting, Several, Text, flag_name, setting,
                                 validate_declared)
from nnunet_ima.errors import UserInputError
from nnunet_ima.io import read_json, write_text
from nnunet_ima.nnunet.ablation import OPTIONS_FILENAME, RESULTS_FILENAME, AblationOptions

CASE_SETS = ("val", "test")
IMA_KIND = "ima"


@dataclass(frozen=True)
class SummaryOptions:
    """What ``nnunet-ima ablation-summary`` reads and where it chooses."""

    workdirs: Sequence[str] = setting(
        rule=Several(Text()),
        help="workdirs of nnunet-ima ablation (one per dataset), each holding the ablation.json "
             "its report wrote")
    cases: str = setting(
        "val", rule=Choice(CASE_SETS),
        help="the case set the default is chosen on; the other is tabulated beside it, for the "
             "same models, and chooses nothing. Choose on val, never on test: a choice made on "
             "the test cases leaves no held-out evidence for it")
    candidates: Sequence[str] = setting(
        (), rule=Several(Text(), minimum=0),
        help="the IMA readings (models of kind ima) the default is chosen from, default every "
             "one the workdirs hold")
    output: Optional[str] = setting(None, rule=Text(), optional=True,
                                    help="also write the tables to this markdown file")

    def __post_init__(self):
        # Lists as a program or argparse gives them; the options keep tuples (they are frozen).
        for f in fields(self):
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))


@dataclass(frozen=True)
class Cell:
    """One model on one dataset and case set: its kind, its means over the seeds (%) and the
    models that dominate it within the intervals."""

    kind: str
    clean_tvdi: float
    auc_tvdi: float
    dominated_by: Tuple[str, ...]


@dataclass(frozen=True)
class Ablation:
    """The report of one workdir: ``cells[case set][model]``, models in table order."""

    workdir: str
    dataset: str  # the dataset's name (its id as the user gave it, in a report without it)
    seeds: int
    cells: Dict[str, Dict[str, Cell]]
    options: dict  # the ablation's options, as its report records them

    @property
    def label(self) -> str:
        """The column header: the dataset and its number of seeds."""
        return f"{self.dataset} ({self.seeds} seed{'s' * (self.seeds != 1)})"


# ------------------------------------------------------------------------------- reading
def rerun_command(options: dict, workdir: str, cases: Optional[Sequence[str]] = None) -> str:
    """The ``nnunet-ima ablation`` command line of a recorded report's ``options`` (the options
    that differ from their defaults, ``--workdir`` as given here, ``--cases`` replaced by
    ``cases`` where given): the same command, which resumes, trains and evaluates only what is
    missing and rewrites the report."""
    values = dict(options, workdir=workdir, **({"cases": list(cases)} if cases else {}))
    words = ["nnunet-ima", "ablation"]
    for f in fields(AblationOptions):
        if f.name not in values or values[f.name] is None:
            continue
        value = values[f.name]
        default = json.loads(json.dumps(f.default)) if f.default is not MISSING else MISSING
        if f.name not in ("dataset", "workdir") and value == default:
            continue
        items = value if isinstance(value, list) else [value]
        words += [flag_name(f.name)] + [f"{v:g}" if isinstance(v, float) else str(v)
                                        for v in items]
    return " ".join(map(shlex.quote, words))


def _make_it(workdir: str) -> str:
    return (f"`nnunet-ima ablation -d DATASET --workdir {shlex.quote(workdir)} ...` writes it "
            f"when its models are trained and evaluated")


def read_ablation(workdir: str) -> Ablation:
    """The report of ``workdir`` (its ``ablation.json``).

    Raises:
        UserInputError: the workdir or its report is missing, is not a report of nnunet-ima
            ablation, or was written before the report named the dominating models (the fix:
            the same ablation command again, which only re-reads the evaluations).
    """
    path = os.path.join(workdir, RESULTS_FILENAME)
    if not os.path.isdir(workdir):
        raise UserInputError(f"{workdir} is not a folder; give the --workdir of an ablation: "
                             f"{_make_it(workdir)}")
    if not os.path.isfile(path):
        started = os.path.isfile(os.path.join(workdir, OPTIONS_FILENAME))
        raise UserInputError(
            f"{workdir} holds no {RESULTS_FILENAME}: {_make_it(workdir)}"
            + (f" (its {OPTIONS_FILENAME} says an ablation started there and has not reported "
               f"yet: run the same command again)" if started else ""))
    record = read_json(path, f"run the ablation that made {workdir} again to rewrite it")
    if not (isinstance(record, dict) and isinstance(record.get("options"), dict)
            and isinstance(record.get("cases"), dict)):
        raise UserInputError(f"{path} is not a report of nnunet-ima ablation (no options and "
                             f"cases); {_make_it(workdir)}")
    options = record["options"]
    cells: Dict[str, Dict[str, Cell]] = {}
    for cases, rows in record["cases"].items():
        cells[cases] = {}
        for row in rows:
            statistics = row.get("statistics") or {}
            if "dominated_by" not in statistics:
                raise UserInputError(
                    f"{path} was written before the report named the models that dominate each "
                    f"one within the intervals: run its ablation again, which trains and "
                    f"evaluates nothing that is done and only rewrites the report from the "
                    f"evaluations: {rerun_command(options, workdir)}")
            cells[cases][row["name"]] = Cell(
                row["kind"], float(statistics["clean_tvdi"]["mean"]),
                float(statistics["auc_tvdi"]["mean"]), tuple(statistics["dominated_by"]))
    seeds = len(options.get("seeds") or []) or 1
    return Ablation(workdir, str(record.get("dataset_name") or options.get("dataset")), seeds,
                    cells, options)


def _dataset_key(name: str) -> str:
    """A dataset's identity: its id in ``Dataset990_Name`` or ``990``, else the name."""
    match = re.fullmatch(r"(?:Dataset)?0*(\d+)(?:_.*)?", name)
    return match.group(1) if match else name


def read_ablations(workdirs: Sequence[str], cases: str) -> List[Ablation]:
    """The reports of ``workdirs``, each holding ``cases``, each of another dataset.

    Raises:
        UserInputError: as :func:`read_ablation`; a report without the case set ``cases``
            (naming the command that evaluates it); two workdirs of one dataset.
    """
    ablations = [read_ablation(w) for w in workdirs]
    seen: Dict[str, str] = {}
    for a in ablations:
        key = _dataset_key(a.dataset)
        if key in seen:
            raise UserInputError(f"{seen[key]} and {a.workdir} are both ablations of "
                                 f"{a.dataset}: the summary counts datasets, so one dataset "
                                 f"must not count twice; give one of them")
        seen[key] = a.workdir
    for a in ablations:
        if cases not in a.cells:
            have = list(a.cells)
            raise UserInputError(
                f"{a.workdir} has no report of its {cases} cases (it has {', '.join(have)}): "
                f"evaluate them with the same ablation and --cases {' '.join(have + [cases])}, "
                f"which trains nothing again: "
                f"{rerun_command(a.options, a.workdir, have + [cases])}")
    return ablations


# ------------------------------------------------------------------------------ choosing
def undominated_counts(ablations: Sequence[Ablation], cases: str) -> Dict[str, Tuple[int, int]]:
    """Per model (in order of first appearance): ``(datasets where nothing dominates it,
    datasets holding it)`` on ``cases``."""
    counts: Dict[str, Tuple[int, int]] = {}
    for a in ablations:
        for name, cell in a.cells.get(cases, {}).items():
            free, held = counts.get(name, (0, 0))
            counts[name] = (free + (not cell.dominated_by), held + 1)
    return counts


def _mean_rank(ablations: Sequence[Ablation], cases: str, names: Sequence[str],
               score: str) -> Optional[Dict[str, float]]:
    """Mean over the datasets holding every one of ``names`` of each one's rank among them by
    ``score`` (1 = the highest; equal scores share the better rank); ``None`` where no dataset
    holds them all."""
    common = [a.cells[cases] for a in ablations if all(n in a.cells[cases] for n in names)]
    if not common:
        return None
    ranks = {n: 0.0 for n in names}
    for cells in common:
        for n in names:
            ranks[n] += 1 + sum(getattr(cells[m], score) > getattr(cells[n], score)
                                for m in names)
    return {n: r / len(common) for n, r in ranks.items()}


def kinds(ablations: Sequence[Ablation], cases: str) -> Dict[str, str]:
    """Every model's kind (as the first report holding it has it)."""
    found: Dict[str, str] = {}
    for a in ablations:
        for name, cell in a.cells[cases].items():
            found.setdefault(name, cell.kind)
    return found


def choose_default(ablations: Sequence[Ablation], cases: str,
                   candidates: Sequence[str] = ()) -> Tuple[Optional[str], str]:
    """The IMA reading undominated on the most datasets, and the line that says so.

    Args:
        candidates: the readings to choose from, default every IMA model of the reports.

    Returns:
        ``(name, line)``: ``name`` ``None`` where no candidate is undominated on any dataset,
        the line then naming what is undominated instead, or where the reports hold no IMA
        reading.

    Raises:
        UserInputError: a candidate no report holds, or one that is no IMA reading.
    """
    kind = kinds(ablations, cases)
    readings = [n for n, k in kind.items() if k == IMA_KIND]
    for name in candidates:
        if name not in kind:
            raise UserInputError(f"--candidates {name}: no report holds a model of that name on "
                                 f"its {cases} cases; its IMA readings: "
                                 f"{', '.join(readings) or 'none'}")
        if kind[name] != IMA_KIND:
            raise UserInputError(f"--candidates {name}: a model of kind {kind[name]}, not an IMA "
                                 f"reading; choose from {', '.join(readings) or 'none'}")
    pool = list(dict.fromkeys(candidates)) or readings
    if not pool:
        return None, (f"no IMA reading (a model of kind ima) in the reports' {cases} cases: "
                      f"nothing to choose from")
    counts = undominated_counts(ablations, cases)
    n = len(ablations)
    best = max((counts[name][0] for name in pool), default=0)
    if best == 0:
        free = sorted(((f, name) for name, (f, _) in counts.items() if f > 0),
                      key=lambda t: -t[0])
        what = ", ".join(f"{name} on {f} of {n}" for f, name in free) or "no model at all"
        none = "no IMA reading" if not candidates else "no candidate"
        return None, (f"{none} is undominated on any dataset ({cases} cases): undominated are "
                      f"{what}")
    tied = [name for name in pool if counts[name][0] == best]
    chosen, tie = tied[0], ""
    if len(tied) > 1:
        auc = _mean_rank(ablations, cases, tied, "auc_tvdi")
        clean = _mean_rank(ablations, cases, tied, "clean_tvdi")
        if auc is None or clean is None:
            chosen = min(tied)
            how = "by name: no dataset holds them all"
        else:
            chosen = min(tied, key=lambda t: (auc[t], clean[t], t))
            how = ("by the mean rank over the datasets holding them all of TVDI AUC ("
                   + ", ".join(f"{t} {auc[t]:g}" for t in tied) + "), then of clean TVDI ("
                   + ", ".join(f"{t} {clean[t]:g}" for t in tied) + "), then by name")
        tie = f"; tied with {', '.join(t for t in tied if t != chosen)}, broken {how}"
    return chosen, (f"default by the evidence: {chosen} (undominated on {best} of {n} datasets, "
                    f"{cases} cases{tie})")


# ------------------------------------------------------------------------------- tables
def _cell_text(cell: Optional[Cell]) -> str:
    if cell is None:
        return "-"
    mark = f"dominated by {', '.join(cell.dominated_by)}" if cell.dominated_by else "undominated"
    return f"{cell.clean_tvdi:.2f} / {cell.auc_tvdi:.2f}, {mark}"


def summary_table(ablations: Sequence[Ablation], cases: str,
                  kind: Optional[Dict[str, str]] = None) -> str:
    """One row per model (those of ``kind``, model -> kind, default every model of the reports
    on ``cases``), one column per dataset holding ``cases``: "clean TVDI / TVDI AUC" and its
    mark; the last column counts the datasets where it is undominated, of those holding it."""
    present = [a for a in ablations if cases in a.cells]
    kind = kind if kind is not None else kinds(present, cases)
    names = list(kind)
    counts = undominated_counts(present, cases)
    header = ["model", "kind"] + [a.label for a in present] + ["undominated on"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        free, held = counts.get(name, (0, 0))
        lines.append("| " + " | ".join(
            [name, kind.get(name, "-")]
            + [_cell_text(a.cells[cases].get(name)) for a in present]
            + [f"{free} of {held}" if held else "-"]) + " |")
    return "\n".join(lines) + "\n"


def _missing_note(ablations: Sequence[Ablation], cases: str) -> str:
    """A note where the datasets hold different non-IMA models: an IMA reading is undominated
    more easily on a dataset with fewer of them."""
    kind = kinds(ablations, cases)
    others = [n for n, k in kind.items() if k != IMA_KIND]
    missing = [(a.label, [n for n in others if n not in a.cells[cases]]) for a in ablations]
    missing = [(label, names) for label, names in missing if names]
    if not missing:
        return ""
    return ("Note: the datasets do not hold the same non-IMA models, and a model is undominated "
            "more easily where fewer can dominate it; missing: "
            + "; ".join(f"{label}: {', '.join(names)}" for label, names in missing) + ".\n")


def summarize(options: SummaryOptions) -> str:
    """The markdown text of ``nnunet-ima ablation-summary``: the table of ``options.cases``, the
    default by the evidence, then the other case set's table for the same models (where any
    report holds it)."""
    ablations = read_ablations(options.workdirs, options.cases)
    _, line = choose_default(ablations, options.cases, options.candidates)
    kind = kinds(ablations, options.cases)
    caption = (f"Ablations side by side, {options.cases} cases: per model and dataset, clean TVDI "
               f"/ TVDI AUC (%, means over the seeds) and the models that dominate it within the "
               f"intervals (a clean, Adv, baseline or fine-tuned model at least as good on both "
               f"means, with a paired difference above 0 on one: the ablation's interval "
               f"table), or undominated. undominated on: the datasets where nothing dominates "
               f"it, of those holding it.")
    if options.cases == "test":
        caption += (" Chosen on the test cases: their numbers are no longer held-out evidence "
                    "for the choice.")
    parts = [caption, summary_table(ablations, options.cases),
             _missing_note(ablations, options.cases), line]
    other = next(c for c in CASE_SETS if c != options.cases)
    if any(other in a.cells for a in ablations):
        parts += [f"The same models on the {other} cases (reported only: the choice above is "
                  f"made on the {options.cases} cases).", summary_table(ablations, other, kind)]
    return "\n\n".join(p.strip() for p in parts if p) + "\n"


def run_summary(options: SummaryOptions) -> str:
    """:func:`summarize`, written to ``options.output`` where given; returns the text.

    Raises:
        UserInputError: an option out of range, or as :func:`summarize`.
    """
    try:
        validate_declared(options)
    except InvalidSetting as e:
        raise UserInputError(e.spelled(flag_name)) from None
    if options.output and os.path.isdir(options.output):
        raise UserInputError(f"--output {options.output} is a folder; give a file name, e.g. "
                             f"{os.path.join(options.output, 'ablation_summary.md')}")
    text = summarize(options)
    if options.output:
        try:
            write_text(options.output, text)
        except OSError as e:
            raise UserInputError(f"--output {options.output} cannot be written ({e}); give "
                                 f"another file") from None
    return text
