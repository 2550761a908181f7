"""``build_parser``: every command's parser, its flags generated from the typed configs
(``flags.py``). Written by hand are only the options that are no config field: ``-q`` / ``-v``,
``train --resume`` (with the three settings a resumed run may change, passed to the API as they are),
``--config`` and ``--set``."""

from __future__ import annotations

import argparse

from dinotune.cli.commands import (
    cmd_analyze,
    cmd_compare,
    cmd_data_download,
    cmd_demo,
    cmd_eval,
    cmd_export,
    cmd_models,
    cmd_pca,
    cmd_predict,
    cmd_serve,
    cmd_sweep,
    cmd_train,
)
from dinotune.cli.embedding import add_embedding_parsers
from dinotune.cli.flags import (
    _add_predict_task_flags,
    add_config_flags,
    add_task_config_flags,
)
from dinotune.config import (
    TASK_CONFIGS,
)
from dinotune.config.commands import (
    AnalyzeConfig,
    CompareConfig,
    DemoConfig,
    DownloadConfig,
    EvalConfig,
    PredictConfig,
)
from dinotune.config.tools import ExportConfig, PcaConfig, ServeConfig, SweepConfig
from dinotune.tasks import registry

EXAMPLES = """examples:
  dinotune demo                                    # offline demo on scikit-learn's digits
  dinotune train classify --data hymenoptera/ --model facebook/dinov2-small --adapter lora --out runs/ants
  dinotune train classify --data train.csv --val-data val.csv --adapter none --cache-features
  dinotune train --resume runs/ants                # continue exactly where it stopped
  dinotune eval runs/ants --data hymenoptera/      # metrics JSON on the val split
  dinotune predict runs/ants photos/ --top-k 3 --format csv
  dinotune train detect --data coco/ --model facebook/dinov2-small --lightweight --subset 1000 --out runs/det
  dinotune predict runs/det test2017/ --out results.json --draw drawn/
  dinotune compare --data coco/ --runs runs/det --yolo yolov8n.pt --out runs/compare
  dinotune sweep classify --data hymenoptera/ --grid adapter=none,lora rank=4,16 lr=1e-4,3e-4 --out runs/sweep
"""


CONFIG_NOTE = ("Every option below is a key of the saved config.yaml; flags override --config FILE.yaml, "
               "which overrides the defaults shown.")


def _download_epilog() -> str:
    from dinotune.data.download.catalog import CATALOG, MIRROR_ENV, human_size

    lines = ["datasets: their archives (size; checksum verified) and the layout they give"]
    for entry in CATALOG.values():
        lines.append(f"  {entry.name:12s} {entry.title}; splits {', '.join(entry.splits)}"
                     + (f" ({entry.note})" if entry.note else ""))
        seen: list = []
        for archive in (a for archives in entry.splits.values() for a in archives):
            if archive not in seen:
                seen.append(archive)
                lines.append(f"  {'':12s}   {archive.file_name} ({human_size(archive.size)}; "
                             f"{archive.checksum[0] if archive.checksum else 'no checksum published'})")
        lines.append(f"  {'':12s}   -> {entry.layout}")
    lines += ["", (f"--mirror URL (or ${MIRROR_ENV}) replaces the official base URL: each archive is fetched "
                   "from URL/<its path under the official base> (e.g. URL/zips/val2017.zip for COCO)."),
              "examples:",
              "  dinotune data download hymenoptera",
              "  dinotune data download coco --splits val --to data/coco"]
    return "\n".join(lines)


def _add_data_parser(sub: argparse._SubParsersAction) -> None:
    from dinotune.data.download.catalog import CATALOG

    p_data = sub.add_parser("data", help="get datasets: download and extract the official archives",
                            description="Dataset tools.")
    p_data.set_defaults(func=lambda ns: (p_data.print_help(), 2)[1])
    data_sub = p_data.add_subparsers(dest="data_command", metavar="COMMAND")
    p_dl = data_sub.add_parser(
        "download", help="download coco, voc, ade20k or hymenoptera into data/<name>",
        description="Download a dataset's official archives (streamed with a progress bar, resumed after an "
                    "interruption, checked against the published size and checksum) and extract them into the "
                    "layout dinotune reads. A second call finds the dataset done and does nothing.",
        epilog=_download_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    splits = sorted({s for e in CATALOG.values() for s in e.splits})
    add_config_flags(p_dl, DownloadConfig, choices={"dataset": list(CATALOG), "splits": splits})
    p_dl.set_defaults(func=cmd_data_download)


# -------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinotune", description="Fine-tune DINOv2 / DINOv3 (LoRA, DoRA, full or frozen) for vision tasks.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors and results")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="more detail, e.g. the optimizer's parameter groups and learning rates")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_train = sub.add_parser("train", help="train a model and write a run folder",
                             description="Train a model. Flags override --config FILE.yaml, which overrides defaults.",
                             epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p_train.add_argument("--resume", metavar="RUN",
                         help="continue RUN exactly where it stopped, with its own saved settings; only "
                              "--device, --workers, --threads and --progress / --no-progress may be given with it")
    p_train.add_argument("--device", dest="resume_device", help=argparse.SUPPRESS)
    p_train.add_argument("--workers", dest="resume_workers", type=int, help=argparse.SUPPRESS)
    p_train.add_argument("--threads", dest="resume_threads", type=int, help=argparse.SUPPRESS)
    p_train.add_argument("--progress", dest="resume_progress", action=argparse.BooleanOptionalAction,
                         help=argparse.SUPPRESS)
    tasks = p_train.add_subparsers(dest="task", metavar="TASK")
    for name, cls in TASK_CONFIGS.items():
        text = registry.entry(name).help
        p = tasks.add_parser(name, help=text[0].lower() + text[1:], description=text + ". " + CONFIG_NOTE)
        add_task_config_flags(p, cls)
        p.set_defaults(func=cmd_train)
    p_train.set_defaults(func=cmd_train, task=None)
    for name, cls in TASK_CONFIGS.items():  # tasks with a command of their own: the same as train NAME
        entry = registry.entry(name)
        if entry.command:
            p = sub.add_parser(entry.command, help=f"{entry.help[0].lower() + entry.help[1:]} (= train {name})",
                               description=entry.help + ". " + CONFIG_NOTE)
            add_task_config_flags(p, cls)
            p.set_defaults(func=cmd_train, task=name, resume=None)

    p_sweep = sub.add_parser("sweep", help="train a grid of settings and compare metric, memory and speed",
                             description="Train every setting of a grid (or an optuna search over it) as a run "
                                         "folder in its own process, and compare them in one table and chart.")
    sweep_tasks = p_sweep.add_subparsers(dest="task", metavar="TASK")
    for name, cls in TASK_CONFIGS.items():
        # "resolve": the sweep's own --out (the sweep folder) replaces the run folder's flag
        p = sweep_tasks.add_parser(
            name, help=f"sweep {name} settings", conflict_handler="resolve",
            description=f"Sweep {name} settings: every option below is the base setting of every trial "
                        "(flags override --config FILE.yaml); --grid names what varies. SWEEP/results.md, "
                        "results.csv and pareto.png compare the trials; calling again continues the sweep.")
        add_task_config_flags(p, cls)
        add_config_flags(p.add_argument_group("sweep options"), SweepConfig)
        p.set_defaults(func=cmd_sweep)
    p_sweep.set_defaults(func=cmd_sweep, task=None)

    p_eval = sub.add_parser("eval", help="evaluate a run on a dataset (metrics JSON)",
                            description="Metrics of a run on a dataset: classification top-1/top-5/F1/... with "
                                        "a confusion matrix; detection COCO AP/AR with per-class AP and a PR curve.")
    add_config_flags(p_eval, EvalConfig)
    p_eval.set_defaults(func=cmd_eval)

    p_pred = sub.add_parser("predict", help="predict images or folders (classes or boxes, JSON or CSV)",
                            description="Classification: top-k classes per image. Detection: COCO results "
                                        "JSON (test-dev style) or CSV, optionally drawn images. Segmentation: "
                                        "per-image class pixel shares (JSON or CSV), optionally label PNGs "
                                        "(--masks) and colour overlays (--draw).")
    add_config_flags(p_pred, PredictConfig)
    _add_predict_task_flags(p_pred)
    p_pred.set_defaults(func=cmd_predict)

    p_exp = sub.add_parser("export", help="export a run: ONNX (+ the torch-free runtime), TorchScript or transformers",
                           description="Write a run in another format into --out: onnx (one graph, backbone with "
                                       "LoRA / DoRA merged + head + the tensor part of the post-processing, fixed "
                                       "image size, dynamic batch; dinotune_export.json beside it for dinotune.runtime "
                                       "and `dinotune predict DIR`), torchscript (the same graph traced; deprecated by "
                                       "PyTorch) or hf (a classification run as a transformers folder).")
    add_config_flags(p_exp, ExportConfig)
    p_exp.set_defaults(func=cmd_export)

    p_an = sub.add_parser("analyze", help="charts and sample pictures from a run",
                          description="Training curves, and per task: confusion matrix / per-class F1, or per-class "
                                      "AP, precision-recall curve, confidence histogram and drawn samples.")
    add_config_flags(p_an, AnalyzeConfig)
    p_an.set_defaults(func=cmd_analyze)

    p_cmp = sub.add_parser("compare", help="compare detectors (our runs, YOLO weights) on the same images",
                           description="Evaluate several detectors on the same images with the same metric code "
                                       "(COCO AP suite, and the single-object metrics) and write one table "
                                       "(JSON + Markdown) and charts.")
    add_config_flags(p_cmp, CompareConfig)
    p_cmp.set_defaults(func=cmd_compare)

    p_demo = sub.add_parser("demo", help="offline demo: fine-tune on scikit-learn's handwritten digits")
    add_config_flags(p_demo, DemoConfig)
    p_demo.set_defaults(func=cmd_demo)

    p_pca = sub.add_parser("pca", help="PCA of patch features as RGB pictures (any backbone or run)",
                           description="The first three principal components of the patch features, fitted "
                                       "jointly over the given images, shown as RGB beside each image.")
    add_config_flags(p_pca, PcaConfig)
    p_pca.set_defaults(func=cmd_pca)

    add_embedding_parsers(sub)

    p_serve = sub.add_parser("serve", help="serve a run or an exported ONNX model over HTTP, with an upload page",
                             description="An HTTP server for one model: the page at / (upload an image, see the "
                                         "top-k bars, boxes or mask drawn), POST /predict (multipart field 'file' "
                                         "-> the JSON record of dinotune predict; ?overlay=1 adds the drawing) and "
                                         "GET /health. Needs pip install 'dinotune[serve]'.")
    add_config_flags(p_serve, ServeConfig)
    p_serve.set_defaults(func=cmd_serve)

    p_models = sub.add_parser("models", help="list the backbones --model accepts (DINOv2, DINOv3), by family")
    p_models.set_defaults(func=cmd_models)

    _add_data_parser(sub)
    return parser
