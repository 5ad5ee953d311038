"""Rule-based step-wise rewards of StepGRPO: StepRAR (accuracy) and StepRVR (validity), and the batched
key-step matcher they use."""

from r1vl_fast.rewards.answers import MathVerifier, same_answer
from r1vl_fast.rewards.format import final_answer
from r1vl_fast.rewards.key_steps import (
    CompiledKeySteps,
    compile_key_steps,
    match_key_step_counts,
    match_key_step_groups,
    match_key_steps,
    normalize,
)
from r1vl_fast.rewards.step_rar import StepRARScores, score_step_rar, step_rar
from r1vl_fast.rewards.step_rvr import step_rvr

__all__ = [
    "CompiledKeySteps",
    "MathVerifier",
    "StepRARScores",
    "compile_key_steps",
    "final_answer",
    "match_key_step_counts",
    "match_key_step_groups",
    "match_key_steps",
    "normalize",
    "same_answer",
    "score_step_rar",
    "step_rar",
    "step_rvr",
]
