"""``koopnet study``: observables, baselines, ablations and spectra over several seeds.

For each seed the clean protocol runs once (``run_experiment``: base model, scaled layers, the
delay-DMD sweep). Its base model and scaled layers are then reused for everything else:

- comparison: for each layer and number of nonlinear blocks h, delay DMD, plain DMD on s_h
  (identity), polynomial EDMD and random-Fourier (RBF) EDMD on the delay vector, and RBF EDMD
  with a fitted read-out, each with rank and Tikhonov value chosen on validation;
- baselines: ridge, reduced-rank ridge, Jacobian linearisation (each replacing the layer
  directly) and softmax regression on the inputs;
- ablations: He vs near-identity inserts, N in {5, 10, 20}, constant observable on/off,
  windows within trajectories vs the paper's concatenated series, selected vs full rank;
- spectra (first seed): eigenvalue grid over trajectories x delays with ResDMD residuals,
  singular value decay, Hankel right singular vectors, modes on neurons, decision boundaries.

Results go under new top-level keys of results.json ("comparison", "baselines", "ablations",
"seeds", "study"); spectra are saved in ``spectra.safetensors`` so every figure can be redrawn
from the run folder alone (:func:`koopnet.lab.spectra.make_figures`).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
from tqdm.auto import tqdm

from koopnet.dmd import DMD, PairStatistics
from koopnet.hybrid import KoopmanHybrid
from koopnet.lab.baselines import (
    jacobian_baseline,
    reduced_rank_baseline,
    ridge_baseline,
    softmax_floor,
)
from koopnet.lab.predict import state_errors
from koopnet.lab.protocols import (
    data_on,
    load_protocol_data,
    result_row,
    run_experiment,
    score_states,
    select,
    sweep_layer,
)
from koopnet.lab.recipes import default_config
from koopnet.lab.scaling_variants import SCALING_VARIANTS, scaling_variant_rows
from koopnet.lab.spectra import hankel_right_singular_vectors, resdmd_residuals
from koopnet.learned import LearnedObservable
from koopnet.models import model_device, predict_logits
from koopnet.observables import Polynomial, RandomFourier, TimeDelay, snapshot_pairs
from koopnet.scaling import scale_layer
from koopnet.spec import FitSpec
from koopnet.trajectories import collect_trajectories

log = logging.getLogger(__name__)

OBSERVABLES = ("delay", "identity", "polynomial", "rbf", "rbf, fitted read-out", "learned")
#: learned observables by name: "learned" (psi reads the delay vector, one hidden layer) and one
#: whose encoder costs one inserted block (psi = tanh(s_t A + b), A [W, W]: W^2 multiply-adds)
LEARNED = {"learned": {}, "learned, 1-block encoder": {"encoder_input": "state", "hidden": 0}}


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Grids of the study. Every choice is made on validation accuracy."""

    seeds: tuple = (0, 1, 2, 3, 4)
    # the same grid for every observable, as wide as the main sweep's where it matters, so no
    # observable is compared on a coarser grid than the delay DMD (rows chosen on validation)
    ranks: tuple = (None, 0, 0.999, 0.99)
    tikhonovs: tuple = (0.0, 1e-4, 1e-2)
    constants: tuple = (False, True)
    poly_max_features: int = 200
    rff_features: int = 200
    rff_scale: float = 2.0
    # learned observable (koopnet.learned): latent dims (None: the layer width), Adam steps
    learned_latent: int | None = None
    learned_steps: int = 300
    inserted: tuple = (5, 20)
    # layers whose scaling is re-trained for the init and N ablations (the costly part)
    scaling_ablation_layers: tuple = (1,)
    # (label, ScalingSpec) of the "scaling variant" ablation (koopnet.lab.scaling_variants)
    scaling_variants: tuple = SCALING_VARIANTS
    eig_trajectories: tuple = (50, 500)
    eig_delays: tuple = (1, 10, 50, 100)
    hankel_stacks: tuple = (1, 10, 50)
    grid_points: int = 200


def make_observable(name: str, h: int, config: StudyConfig, seed: int = 0,
                    constant: bool = True):
    """The dictionary ``name`` on the delay vector of h delays (identity: no delays)."""
    if name == "delay":
        return TimeDelay(h, constant=constant)
    if name == "identity":
        return TimeDelay(0, constant=constant)
    if name == "polynomial":
        return Polynomial(2, h, max_features=config.poly_max_features, constant=constant)
    if name in ("rbf", "rbf, fitted read-out"):
        return RandomFourier(config.rff_features, h, scale=config.rff_scale, seed=seed,
                             constant=constant, include_state=name == "rbf")
    if name in LEARNED:
        return LearnedObservable(h, latent_dims=config.learned_latent,
                                 n_steps=config.learned_steps, seed=seed, constant=constant,
                                 **LEARNED[name])
    raise ValueError(f"observable={name!r} is unknown; use one of "
                     f"{(*OBSERVABLES, *LEARNED)}.")


def fit_observable(name: str, h: int, train_states: torch.Tensor, config: StudyConfig,
                   seed: int = 0, constant: bool = True):
    """Fit the dictionary and the Gram statistics of its within-trajectory training pairs."""
    observable = make_observable(name, h, config, seed, constant)
    start = h if name == "identity" else 0  # plain DMD rolls out from s_h
    lifted = observable.fit_transform(train_states[:, start:])  # [B, T', D]
    return observable, PairStatistics.from_pairs(*snapshot_pairs(lifted))


def compare_layer(scaled, train_states, states, labels, delays, config: StudyConfig,
                  seed: int = 0, exact_rollout: bool = False,
                  observables: tuple[str, ...] = OBSERVABLES) -> tuple[list[dict], dict]:
    """Best validation row for every (observable, h); also returns the fitted (observable, DMD)
    of each row, keyed by (observable, h). ``exact_rollout`` as in the protocol's DMD (the clean
    protocol's within-trajectory pairs need it; see ``koopnet.dmd.DMD``)."""
    rows, fits = [], {}
    for name, h in ((name, h) for name in observables for h in delays):
        best = None
        for constant in config.constants:
            observable, stats = fit_observable(name, h, train_states, config, seed, constant)
            first = h - observable.n_delays  # identity: lift s_h only
            lifted = {k: observable.transform(v[:, first:h + 1])[:, -1]
                      for k, v in states.items()}  # [B, D], lifted once per dictionary
            for rank in config.ranks:
                for tikhonov in config.tikhonovs:
                    try:
                        dmd = DMD(rank, tikhonov=tikhonov,
                                  exact_rollout=exact_rollout).fit_statistics(stats)
                    except ValueError as err:
                        log.info("skipping %s h=%d rank=%s: %s", name, h, rank, err)
                        continue
                    hybrid = KoopmanHybrid.from_dmd(scaled, observable, dmd, n_blocks=h)
                    with torch.no_grad():  # = hybrid.forward_states(states[k])
                        scores = {f"{k}_accuracy": float(
                            (hybrid.forward_lifted(g).argmax(1) == labels[k]).float().mean())
                            for k, g in lifted.items()}
                    spec = FitSpec(h, rank, tikhonov, constant, exact_rollout=exact_rollout)
                    row = result_row(hybrid, spec, scores, observable=name, seed=seed,
                                     lifted_dimension=observable.n_output_features_)
                    key = (row["val_accuracy"], -row["rank_resolved"])
                    if best is None or key > best[0]:
                        best = (key, row, (observable, dmd))
        if best is not None:  # what the chosen K predicts at every step, and its spectrum
            best[1]["test_state_errors"] = state_errors(*best[2], states["test"], h, scaled.width,
                                                   scaled.out_width)
            best[1]["spectral_radius"] = float(best[2][1].eigenvalues_.abs().max())
            rows.append(best[1])
            fits[(name, h)] = best[2]
    return rows, fits


def _matched_rank(scaled, koopman_parameters: int) -> int:
    """Largest reduced rank whose parameter count r(w + w') + w' fits the Koopman map's."""
    w, w_out = scaled.width, scaled.out_width
    fits = (koopman_parameters - w_out) // (w + w_out)  # the full map (r = min) always fits
    return max(1, min(w, w_out, fits))


def layer_baselines(scaled, data, koopman_parameters: int, seed: int) -> list[dict]:
    train, val, test = data.trajectories, data.val, data.test
    rows = [ridge_baseline(scaled, train, val, test),
            reduced_rank_baseline(scaled, train, val, test,
                                  _matched_rank(scaled, koopman_parameters)),
            jacobian_baseline(scaled, train, val, test)]
    return [{**row, "seed": seed} for row in rows]


def _best(rows: list[dict], **filters) -> dict | None:
    kept = [r for r in rows if all(r[k] in v for k, v in filters.items())]
    return select(kept) if kept else None


def _ablation(group: str, layer: int, variant: str, row: dict | None, seed: int,
              **extra) -> dict:
    return {"group": group, "layer": layer, "variant": variant, "seed": seed,
            "val_accuracy": None if row is None else row["val_accuracy"],
            "test_accuracy": None if row is None else row["test_accuracy"],
            "n_delays": None if row is None else row["n_delays"],
            "linear_steps": None if row is None else row["linear_steps"], **extra}


def layer_ablations(config, study: StudyConfig, model, scaled, scaled_init: str, data,
                    sweep_rows: list[dict], seed: int) -> list[dict]:
    """The ablation rows of one layer; the N=10 He row reuses the main run's sweep."""
    layer = scaled.layer
    grid = {"rank": study.ranks, "tikhonov": study.tikhonovs, "constant": study.constants}
    small = dataclasses.replace(config, ranks=study.ranks, tikhonovs=study.tikhonovs,
                                constants=study.constants,
                                delays=tuple(range(max(study.inserted) + 1)))
    main = _best(sweep_rows, **grid)
    rows = [_ablation("scaling init", layer, f"{scaled_init} (main run)", main, seed)]
    variants = [("scaling init", "identity", 10, "near-identity")]
    variants += [("inserted blocks N", "he", n, f"N={n}") for n in study.inserted]
    if layer not in study.scaling_ablation_layers:
        rows, variants = [], []
    for group, init, n, label in variants:
        variant, report = scale_layer(model, layer, data.scaling.X, data.scaling.y,
                                      n_inserted=n, init=init, config=config.scaling,
                                      seed=seed + layer, retries=0)
        best = select(sweep_layer(small, variant, data, False)[0])
        rows.append(_ablation(group, layer, label, best, seed, scaling_ok=report.ok))
    if layer in study.scaling_ablation_layers:
        rows.append(_ablation("inserted blocks N", layer, "N=10 (main run)", main, seed))
        for label, best, extra in scaling_variant_rows(small, study.scaling_variants, model,
                                                       layer, data, seed):
            rows.append(_ablation("scaling variant", layer, label, best, seed, **extra))
    for constant in (False, True):
        rows.append(_ablation("constant observable", layer, f"constant={constant}",
                              _best(sweep_rows, constant=[constant]), seed))
    full = _best(sweep_rows, rank=[None], tikhonov=[0.0])
    rows.append(_ablation("rank / Tikhonov", layer, "full rank, no Tikhonov", full, seed))
    rows.append(_ablation("rank / Tikhonov", layer, "chosen on validation",
                          select(sweep_rows), seed))
    rows += _window_ablation(config, scaled, data, seed)
    return rows


def _window_ablation(config, scaled, data, seed: int) -> list[dict]:
    """Paper-style DMD (full rank, no constant) fitted on windows inside each trajectory vs the
    concatenated series; h chosen on validation for both, same roll-out as the protocol."""
    train = collect_trajectories(scaled, data.trajectories.X)
    sets = {"val": data.val, "test": data.test}
    states = {k: collect_trajectories(scaled, v.X).states for k, v in sets.items()}
    labels = {k: v.y for k, v in sets.items()}
    rows = []
    for variant, series in (("windows in each trajectory", train.states),
                            ("concatenated series (paper)", train.concatenated())):
        candidates = []
        for h in config.delays:
            observable = TimeDelay(h).fit(train.states)
            dmd = DMD(None, exact_rollout=config.exact_rollout)
            dmd.fit_pairs(*snapshot_pairs(observable.transform(series)))
            hybrid = KoopmanHybrid.from_dmd(scaled, observable, dmd)
            candidates.append({"n_delays": h, "linear_steps": hybrid.linear_steps,
                               "rank_resolved": dmd.rank_, **score_states(hybrid, states, labels)})
        rows.append(_ablation("trajectory windows", scaled.layer, variant, select(candidates),
                              seed))
    return rows


def spectra(scaled, data, selected_fit, study: StudyConfig) -> dict[str, torch.Tensor]:
    """Tensors behind the spectral figures of one layer (keys prefixed by ``layer{k}/``)."""
    k = scaled.layer
    train = collect_trajectories(scaled, data.trajectories.X)
    held = collect_trajectories(scaled, data.val.X)
    out: dict[str, torch.Tensor] = {}
    held_series = held.subset(slice(0, max(study.eig_trajectories))).concatenated()
    for m in study.eig_trajectories:
        for h in study.eig_delays:
            series = train.subset(slice(0, m)).concatenated()  # [1, m T, W]
            observable = TimeDelay(h).fit(series)
            dmd = DMD(None).fit_pairs(*snapshot_pairs(observable.transform(series)))
            stats = PairStatistics.from_pairs(*snapshot_pairs(observable.transform(held_series)))
            out[f"layer{k}/eig/M{m}_h{h}"] = torch.view_as_real(dmd.eigenvalues_)  # [R, 2]
            out[f"layer{k}/res/M{m}_h{h}"] = resdmd_residuals(dmd, stats)  # [R]
    series = train.subset(slice(0, max(study.eig_trajectories))).concatenated()[0]  # [n, W]
    for d in study.hankel_stacks:
        s, Vh = hankel_right_singular_vectors(series, d, k=7)
        out[f"layer{k}/rsv/d{d}"] = Vh[:, :60].contiguous()  # [7, 60]: first 5 trajectories
        out[f"layer{k}/hankel_sv/d{d}"] = s / s[0]
    for name in OBSERVABLES:
        observable, stats = fit_observable(name, 10, train.states, study)
        s = stats.spectrum()[0]
        out[f"layer{k}/sv/{name}"] = s / s[0]
    for h in (1, 5):
        s = fit_observable("delay", h, train.states, study)[1].spectrum()[0]
        out[f"layer{k}/sv/delay h={h}"] = s / s[0]
    observable, dmd = selected_fit  # a delay DMD: lift the held-out trajectories the same way
    stats = PairStatistics.from_pairs(*snapshot_pairs(observable.transform(held.states)))
    readout = observable.readout(scaled.width).to(dmd.modes_.dtype)  # [W, D]
    out[f"layer{k}/modes"] = torch.view_as_real(readout @ dmd.modes_).contiguous()  # [W, R, 2]
    out[f"layer{k}/modes_eig"] = torch.view_as_real(dmd.eigenvalues_)
    out[f"layer{k}/modes_res"] = resdmd_residuals(dmd, stats)
    return out


def decision_grid(models: dict, n: int) -> dict[str, torch.Tensor]:
    """Predicted class of each model on an n x n grid over [-0.1, 1.1]^2 (Yin-Yang inputs)."""
    axis = torch.linspace(-0.1, 1.1, n, device="cpu")
    xx, yy = torch.meshgrid(axis, axis, indexing="xy")
    points = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)  # [n*n, 2]
    out = {"grid/axis": axis}
    for name, model in models.items():
        with torch.no_grad():
            logits = predict_logits(model, points.to(model_device(model))).cpu()
            out[f"grid/{name}"] = logits.argmax(1).reshape(n, n)
    return out


def run_study(dataset: str = "yinyang", *, seeds: list[int] | None = None, quick: bool = False,
              study: StudyConfig | None = None, progress: bool = True,
              device: torch.device | str = "cpu") -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """Run the clean protocol and the study for every seed, on ``device``.

    Returns (results of the first seed with the study keys added, its figure objects, spectra).
    """
    if not dataset.startswith("yinyang"):
        raise ValueError(f"dataset={dataset!r}: the study is built for Yin-Yang (2-D inputs, "
                         "small layers); use 'yinyang'.")
    study = study or StudyConfig()
    if seeds is not None:
        study = dataclasses.replace(study, seeds=tuple(seeds))
    if quick:
        study = dataclasses.replace(study, inserted=(5,), eig_trajectories=(50,),
                                    scaling_variants=study.scaling_variants[-1:],
                                    eig_delays=(1, 10), hankel_stacks=(1, 10), grid_points=60,
                                    rff_features=50, poly_max_features=50, learned_steps=30)
    first = None
    rows = {"comparison": [], "baselines": [], "ablations": [], "runs": []}
    timings: dict[str, float] = {}
    for seed in tqdm(study.seeds, desc="seeds", disable=not progress):
        clock = time.perf_counter()
        seed_rows, kept = _study_seed(dataset, seed, study, quick, torch.device(device))
        for key, value in seed_rows.items():
            rows[key] += value
        timings[f"seed{seed}"] = round(time.perf_counter() - clock, 1)
        first = first or kept
        log.info("seed %d done in %.0fs", seed, timings[f"seed{seed}"])
    results, figures, fits_by_layer, data = first
    tensors = _first_seed_tensors(results, figures, fits_by_layer, data, study)
    runs = rows.pop("runs")
    results = {**results, **rows,
               "seeds": {"seeds": list(study.seeds), "runs": runs, "timings_s": timings},
               "study": {"config": _jsonable(dataclasses.asdict(study)), "quick": quick,
                         "decision_layer": results["selected"]["layer"],
                         "decision_setting": {k: results["selected"][k] for k in (
                             "n_delays", "rank", "tikhonov", "constant")}}}
    return results, figures, tensors


def _study_seed(dataset: str, seed: int, study: StudyConfig, quick: bool,
                device: torch.device) -> tuple[dict[str, list], tuple]:
    """Every row of one seed, and what the first seed's spectra and figures need."""
    config = default_config(dataset, seed=seed, quick=quick)
    if quick:  # smoke test: the first layer only
        config = dataclasses.replace(config, layers=config.layers[:1])
    results, figures = run_experiment(config, progress=False, device=device)
    data = data_on(load_protocol_data(config), device)
    out = {"comparison": [], "ablations": [],
           "runs": [{"seed": seed, "original": results["original"], "scaled": results["scaled"],
                     "selected": results["selected"]}],
           "baselines": [{**softmax_floor(data.base, data.val, data.test), "seed": seed},
                         {"layer": None, "method": "original network", "parameters": None,
                          "seed": seed, **results["original"]}]}
    fits_by_layer = {}
    labels = {"val": data.val.y, "test": data.test.y}
    for layer, info in figures["layers"].items():
        scaled = info["scaled"]
        scaled_row = next(r for r in results["scaled"] if r["layer"] == layer)
        out["baselines"].append({"layer": layer, "method": "scaled network", "parameters": None,
                                 "seed": seed, "val_accuracy": scaled_row["val_accuracy"],
                                 "test_accuracy": scaled_row["test_accuracy"]})
        train_states = collect_trajectories(scaled, data.trajectories.X).states
        states = {k: collect_trajectories(scaled, s.X).states
                  for k, s in (("val", data.val), ("test", data.test))}
        rows, fits = compare_layer(scaled, train_states, states, labels, config.delays,
                                   study, seed, config.exact_rollout)
        out["comparison"] += rows
        fits_by_layer[layer] = (rows, fits)
        delay_best = select([r for r in rows if r["observable"] == "delay"])
        out["baselines"] += layer_baselines(scaled, data, delay_best["replacement_parameters"],
                                            seed)
        layer_rows = [r for r in results["sweep"] if r["layer"] == layer]
        out["ablations"] += layer_ablations(config, study, figures["model"], scaled,
                                            scaled_row["init"], data, layer_rows, seed)
    return out, (results, figures, fits_by_layer, data)


def _first_seed_tensors(results, figures, fits_by_layer, data, study: StudyConfig
                        ) -> dict[str, torch.Tensor]:
    """Spectra of every layer and the decision grid of the selected hybrid (first seed)."""
    tensors: dict[str, torch.Tensor] = {}
    for layer, info in figures["layers"].items():
        rows, fits = fits_by_layer[layer]
        best = select([r for r in rows if r["observable"] == "delay"])
        tensors.update(spectra(info["scaled"], data, fits[("delay", best["n_delays"])], study))
    if figures["layers"]:
        info = figures["layers"][results["selected"]["layer"]]
        tensors.update(decision_grid({"original": figures["model"], "scaled": info["scaled"],
                                      "hybrid": info["fit"][1]}, study.grid_points))
        tensors["grid/test_X"], tensors["grid/test_y"] = data.test.X, data.test.y
    return tensors


def _jsonable(value):
    return value if not isinstance(value, tuple) else list(value)
