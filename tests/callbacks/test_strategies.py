"""Strategies the callbacks cannot serve are named at fit start (lightning_conditioning.callbacks.support)."""

from __future__ import annotations


def test_unsupported_strategies_are_named_at_fit_start_and_the_callbacks_step_aside() -> None:
    """Never silently empty, never a wrong number: tensor parallelism, DeepSpeed and classic
    FSDP get a warning naming what to use, and the callbacks do nothing."""
    import warnings
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch import nn

    from lightning_conditioning import ConditioningCallback, WeightDominationCallback

    class DeepSpeedStrategy:  # the name is what is checked: deepspeed itself needs CUDA
        pass

    cases = [ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2), DeepSpeedStrategy()]
    for strategy in cases:
        for callback in (ConditioningCallback(), WeightDominationCallback()):
            trainer = SimpleNamespace(strategy=strategy, optimizers=[], callbacks=[], loggers=[], is_global_zero=True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                callback.on_fit_start(trainer, nn.Sequential(nn.Linear(2, 2)))  # type: ignore[arg-type]
            texts = [str(w.message) for w in caught]
            assert any("does nothing in this run" in t and "FSDP2" in t for t in texts), texts
            if isinstance(strategy, ModelParallelStrategy):  # how to ask for FSDP2 alone
                assert any("ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)" in t for t in texts), (
                    texts
                )
            assert callback.monitor is None
