"""Scan page: pick a model, device, dtype, layers, neuron limit and corpus; scan as a background job; download the active run."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import streamlit as st
import torch

from mechamap_core import analysis, export, hub, placement
from mechamap_core.config import BUNDLED_MODEL_ID, parse_layer_list
from mechamap_core.corpus import CorpusReport, parse_corpus
from mechamap_core.models import BUNDLED_ALIASES, DTYPES, model_depth, model_layers_without_mlp
from mechamap_ui import config_tools, jobs, scanning, state, widgets

MAX_CORPUS_UPLOAD_MB = 5
SOURCES = ["Bundled model (offline)", "Hugging Face id (downloads on demand)", "Local folder"]


def _devices() -> list[str]:
    devices = ["auto", "cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


st.title("Scan")
state.show_flash()
cfg = copy.deepcopy(state.active_config())
problem = config_tools.config_problems(cfg, state.active_config_problems())
n_words = sum(len(w) for w in cfg.categories.values())
st.markdown(
    f"Config **{state.active_config_label()}**: {len(cfg.categories)} categories, {n_words} words, "
    f"master text of {sum(len(t) for t in cfg.texts):,} characters."
)
st.page_link("views/config_editor.py", label="Edit the categories and text on the Config page", icon=":material/tune:")
if problem is not None:
    st.error("The active config cannot be scanned yet: " + "; ".join(msg for _, msg in problem.problems))

# --- model ---------------------------------------------------------------------------------
st.subheader("Model")
folder_problem = None
model_layers = None  # the chosen model's layer count, where the page knows it (models.model_depth)
model_in_config = (cfg.model or BUNDLED_MODEL_ID).strip()
if model_in_config in BUNDLED_ALIASES:
    source_default = SOURCES[0]
elif Path(model_in_config).expanduser().is_dir():
    source_default = SOURCES[2]
else:
    source_default = SOURCES[1]
# the settings start from the active config, and keep what the user set here while it stays the same config
settings_basis = (state.config_version(), model_in_config, tuple(cfg.layers or []), int(cfg.limit_neurons))
setting_defaults = {
    "scan_source": source_default,
    "scan_hub_id": model_in_config if source_default == SOURCES[1] else "gpt2",
    "scan_local_dir": model_in_config if source_default == SOURCES[2] else "",
    "scan_layers": ",".join(map(str, cfg.layers or [])),
    "scan_limit": int(cfg.limit_neurons),
    "scan_corpus_field": cfg.corpus_text_field,
    "scan_corpus_skip": True,
    **dict.fromkeys(["scan_device", "scan_dtype", "scan_spread", "scan_quantization"]),
}  # fmt: skip
state.restore_widgets("scan", setting_defaults, settings_basis)
if st.session_state.get("scan_device", "auto") not in _devices():  # kept from a session that had another device
    del st.session_state["scan_device"]
source = st.radio("Model", SOURCES, key="scan_source", horizontal=True, label_visibility="collapsed")
if source == SOURCES[0]:
    spec = BUNDLED_MODEL_ID
    model_layers, mlp_width = model_depth(spec) or (None, None)
    st.caption(f"{BUNDLED_MODEL_ID}: {model_layers} layers × {mlp_width} MLP neurons, shipped with MechaMap, no download.")
elif source == SOURCES[1]:
    spec = st.text_input(
        "Hugging Face model id", key="scan_hub_id", placeholder="gpt2, EleutherAI/pythia-70m, org/name@revision, ..."
    )
else:
    spec = st.text_input("Local model folder", key="scan_local_dir", placeholder="/path/to/model (with config.json)")
    folder_problem = scanning.local_folder_problem(spec)
    if folder_problem:
        st.error(folder_problem)
    elif (spec or "").strip():
        model_layers = (model_depth(spec) or (None, None))[0]

input_errors: list[str] = [folder_problem] if folder_problem else []
c1, c2, c3, c4 = st.columns(4)
device = c1.selectbox("Device", _devices(), key="scan_device")
dtype = c2.selectbox("Precision", ["auto", *DTYPES], key="scan_dtype", help="auto: float32 on CPU, bfloat16/float16 on GPUs")
if source == SOURCES[1] and (spec or "").strip():
    if hub.hub_offline():
        st.caption("Offline (HF_HUB_OFFLINE=1): the model must already be in the local Hugging Face cache.")
        if offline_problem := scanning.offline_model_problem(spec):
            st.error(offline_problem)
            input_errors.append(offline_problem)
        model_layers = (model_depth(spec) or (None, None))[0]  # from its cached config.json
    else:
        files, problem_with_model = scanning.hub_repo_files(spec)
        if problem_with_model:
            st.warning(problem_with_model)
        elif files is not None:
            model_layers = scanning.hub_model_layers(files)
            st.caption(
                f"{f'{model_layers} layers; ' if model_layers else ''}{len(files.files)} files, "
                f"{placement.human_bytes(files.total_bytes)} ({placement.human_bytes(files.weight_bytes)} of weights) at "
                f"commit {files.commit[:8]}; downloaded into the Hugging Face cache on the first scan. Gated models use "
                "HF_TOKEN from the secrets."
            )
            too_big = scanning.memory_warning(files, device)
            if too_big:
                st.warning(too_big)
with st.expander("Big models: spread over devices, 8/4-bit", icon=":material/memory:"):
    has_cuda = torch.cuda.is_available()
    spread_label = "Spread over GPUs / offload to CPU" if has_cuda else "Offload what does not fit in memory to disk"
    spread = st.checkbox(spread_label, key="scan_spread", help="accelerate's device_map='auto'")
    if scanning.quantization_available():
        quantization = st.radio("Weights", ["full precision", "8bit", "4bit"], key="scan_quantization", horizontal=True)
    else:
        quantization = "full precision"
        st.caption("8-bit and 4-bit loading need a CUDA GPU and the bitsandbytes package.")
    if st.session_state.get(scanning.PLACEMENT):
        st.caption("Placement of the last loaded model: " + st.session_state[scanning.PLACEMENT])
loading = {"device_map": "auto" if spread else None, "quantization": None if quantization == "full precision" else quantization}
layers_text = c3.text_input("Layers (empty = all)", key="scan_layers", placeholder="e.g. 0,2,5-7")
limit = c4.number_input("Neuron limit per layer (0 = all)", key="scan_limit", min_value=0, step=32)
try:
    layers = parse_layer_list(layers_text)
except ValueError as exc:
    layers, layers_problem = None, str(exc)
else:
    layers_problem = widgets.layers_out_of_range(layers, model_layers)  # refused now, not by the job it would start
    if layers and model_layers and not layers_problem:  # built on the meta device once per config (~2 s for 70B)
        layers_problem = widgets.layers_without_mlp_problem(layers, model_layers_without_mlp(spec), model_layers)
if layers_problem:
    c3.error(layers_problem)
    input_errors.append(layers_problem)
cfg = dataclasses.replace(cfg, layers=layers)  # the field starts at the config's layers; empty means all, as it says

# --- optional corpus -----------------------------------------------------------------------
texts = None
with st.expander("Use a corpus file instead of the master text (optional)", icon=":material/description:"):
    upload = st.file_uploader(
        f"Corpus: .txt (one document per line) or .jsonl (max {MAX_CORPUS_UPLOAD_MB} MB)",
        type=["txt", "jsonl"], key="scan_corpus", max_upload_size=MAX_CORPUS_UPLOAD_MB,
    )  # fmt: skip
    field = st.text_input("JSON field with the text (.jsonl only)", key="scan_corpus_field")
    skip_bad = st.checkbox("Skip and count bad documents (invalid JSON, no text field, empty)",
                           key="scan_corpus_skip", help="As the CLI's --on-bad-document skip; off: the first one stops it")  # fmt: skip
    if upload is not None:
        report = CorpusReport()
        try:
            config_tools.check_upload_size(upload, MAX_CORPUS_UPLOAD_MB, "the corpus")
            kind = Path(upload.name).suffix.lower().lstrip(".")
            texts = parse_corpus(upload.getvalue(), kind, field.strip() or "text",
                                 on_bad_document="skip" if skip_bad else "error", report=report)  # fmt: skip
            if report.n_skipped > report.documents:  # e.g. a binary file: a few lines parse as text by chance
                raise ValueError(f"most of it is not usable text ({report.summary()}), so it is likely not the right file")
        except ValueError as exc:
            texts = None
            st.error(f"{config_tools.literal(upload.name)} cannot be used: {config_tools.literal(exc)}.")
            input_errors.append(str(exc))
        else:
            one = len(texts) == 1
            st.success(f"{len(texts):,} document{'' if one else 's'} from {config_tools.literal(upload.name)} "
                       f"replace{'s' if one else ''} the master text for this scan.")  # fmt: skip
            if report.n_skipped:
                st.warning(config_tools.literal(report.summary()) + ".")

state.keep_widgets("scan", setting_defaults, settings_basis)

# --- scan ----------------------------------------------------------------------------------
if texts is None and problem is None and (spec or "").strip():  # what a scan of the master text would leave blank
    coverage = state.coverage_table(cfg.texts, cfg.categories, spec.strip())
    widgets.warnings_box(config_tools.coverage_warnings(coverage, cfg.categories))
can_scan = problem is None and not input_errors and bool((spec or "").strip())
st.caption(jobs.GOES_ON_IN_THE_BACKGROUND)
scan_clicked = st.button("Scan", type="primary", icon=":material/play_arrow:", disabled=not can_scan)
if scan_clicked and texts is not None:
    corpus_label = f"{upload.name} ({len(texts):,} documents)"
    jobs.start_corpus_scan(spec, cfg, corpus_label, device=device, dtype=dtype, texts=texts, loading=loading, layers=layers,
                           limit_neurons=int(limit))  # fmt: skip
elif scan_clicked:
    jobs.start_master_scan(spec, cfg, device=device, dtype=dtype, loading=loading, layers=layers, limit_neurons=int(limit))

jobs.show_jobs()

# --- active run downloads ------------------------------------------------------------------
result = state.active_result()
st.subheader("Active run")
if result is None:
    st.info("No active run yet: press **Scan**, or pick a saved run in the sidebar.")
    st.stop()
md = result.metadata
st.markdown(
    f"`{md.get('model')}` · {analysis.describe_shape(result.scores)} · {scanning.describe_passes(md)} · "
    f"device {md.get('device', '?')} / {md.get('dtype', '?')} · created {str(md.get('created', '?')).replace('T', ' ')}"
)
if (plan := scanning.describe_plan(md)) is not None:
    st.caption(plan, help=md["plan"].get("reason"))
stem = str(md.get("run_id") or "mechamap-scan")
d1, d2, d3, _ = st.columns([1, 1, 1, 2])
d1.download_button("CSV", data=lambda: export.to_csv(result), file_name=f"{stem}.csv", mime="text/csv",
                   on_click="ignore", icon=":material/download:")  # fmt: skip
d2.download_button("JSON", data=lambda: export.to_json(result), file_name=f"{stem}.json", mime="application/json",
                   on_click="ignore", icon=":material/download:")  # fmt: skip
d3.download_button("Parquet", data=lambda: export.to_parquet(result), file_name=f"{stem}.parquet",
                   mime="application/vnd.apache.parquet", on_click="ignore", icon=":material/download:")  # fmt: skip
st.caption("The CSV starts with the original columns (model, layer, neuron, category, avg_activation, top_tokens), "
           "then every statistic. Continue on the Pivot, Overlap and Correlation pages.")  # fmt: skip
