"""params.yaml's tune section -> Ray Tune objects: sampling domains, search algorithm, trial scheduler."""

from __future__ import annotations

import math
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining, TrialScheduler
from ray.tune.search import BasicVariantGenerator, Searcher
from ray.tune.search.optuna import OptunaSearch

from kiln.core.params import SearchDimension, TuneParams

_SAMPLERS = {
    "uniform": tune.uniform, "quniform": tune.quniform, "loguniform": tune.loguniform,
    "qloguniform": tune.qloguniform, "randint": tune.randint, "qrandint": tune.qrandint,
}


def to_domain(dimension: SearchDimension) -> Any:
    """One search dimension as a Ray Tune domain (`grid` -> grid_search, `choice` -> choice, ...)."""
    if dimension.type == "grid":
        return tune.grid_search(dimension.values)
    if dimension.type == "choice":
        return tune.choice(dimension.values)
    bounds: tuple[Any, ...] = (dimension.low, dimension.high)
    if "randint" in dimension.type:
        bounds = (int(dimension.low), int(dimension.high))
    step = () if dimension.q is None else (int(dimension.q) if "randint" in dimension.type else dimension.q,)
    return _SAMPLERS[dimension.type](*bounds, *step)


def trial_count(settings: TuneParams) -> int:
    """How many trials the search runs: num_samples, times the grid's size for grid search."""
    return settings.num_samples * math.prod(len(dim.values or ()) for dim in settings.search_space.values()
                                            if dim.type == "grid")


def param_space(settings: TuneParams) -> dict[str, Any]:
    return {key: to_domain(dimension) for key, dimension in settings.search_space.items()}


def search_algorithm(settings: TuneParams, seed: int) -> Searcher | BasicVariantGenerator:
    """Grid and random search enumerate/sample `param_space`; TPE is Optuna's sampler, seeded."""
    if settings.search == "tpe":
        import optuna

        startup = min(5, settings.num_samples)  # random trials before TPE models the results
        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup))
    return BasicVariantGenerator(random_state=seed)


def scheduler(settings: TuneParams, seed: int) -> TrialScheduler:
    """FIFO runs every trial to the end; ASHA stops weak trials at rungs; PBT copies and perturbs strong ones."""
    if settings.scheduler == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=settings.epochs,
                             grace_period=settings.grace_period, reduction_factor=settings.reduction_factor)
    if settings.scheduler == "pbt":
        mutations = {key: list(dim.values) if dim.values else to_domain(dim)
                     for key, dim in settings.search_space.items()}
        return PopulationBasedTraining(time_attr="training_iteration", hyperparam_mutations=mutations,
                                       perturbation_interval=settings.perturbation_interval)
    return FIFOScheduler()
