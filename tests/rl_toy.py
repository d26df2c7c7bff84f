"""A toy RL world on the tiny random models: a two-call workflow whose score plants one best assignment and
one best adapter direction. Shared by the low-level router and RL tests (and their SIGKILL subprocess)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from haps.config import LoraTarget, ModelSpec, PoolConfig
from haps.data import Problem
from haps.models.pool import ModelPool
from haps.models.types import GenRequest
from haps.routing.high_level import HighLevelRouter, HighLevelRouterConfig
from haps.routing.low_level import HierarchicalRouter, LowLevelConfig
from haps.routing.prompt import space_for
from haps.workflows.base import EpisodeState, PendingCall, Workflow

GOOD_TEACHER = "tiny-gemma3"
WORDS = ["apple", "river", "tiger", "piano", "candle", "rocket", "garden", "window", "silver", "forest",
         "bottle", "castle", "pencil", "thunder", "mirror", "jacket", "planet", "coffee", "dragon", "summer"]


@dataclass
class ToyState(EpisodeState):
    teacher_model: str = ""
    student_tokens: list[int] = field(default_factory=list)


def planted_tokens(pool: ModelPool, seed: int = 0) -> dict[str, frozenset[int]]:
    """Per local model, the tokens whose output embedding points along one fixed random direction u
    (E_t . u > 0): about half the vocabulary, and a direction a rank-r update of the last layers can learn
    (moving the final hidden state along u raises all their logits at once)."""
    out = {}
    for m in pool.config.models:
        W = pool.backend(m.name).model.get_output_embeddings().weight  # (V, d)
        u = torch.randn(W.shape[1], generator=torch.Generator().manual_seed(seed))
        out[m.name] = frozenset(torch.nonzero(W @ u > 0).flatten().tolist())
    return out


class ToyRLWorkflow(Workflow):
    """Teacher speaks, then Student; score = 0.5 [teacher's model is GOOD_TEACHER] + 0.5 * share of the
    Student's tokens in its model's planted set (`planted_tokens`: a direction an adapter can learn)."""

    name = "toy-rl"
    task_description = "A toy task: the router must pick the right teacher; the student must speak planted tokens."
    role_definitions = {"teacher": "Teacher: says something.", "student": "Student: says something else."}
    planted: dict[str, frozenset[int]] = {}  # set per instance (`toy_workflow`)

    def problem_text(self, problem) -> str:
        return problem.question

    def start(self, problem, styles=None) -> ToyState:
        state = ToyState(problem=problem, styles=self._styles(styles))
        state.waiting = [PendingCall("teacher", GenRequest(prompt=f"Teacher, about the {problem.question}:"))]
        return state

    def advance(self, state: ToyState, role: str, generation) -> None:
        call = self._take(state, role)
        self._record(state, call, generation, generation.text)
        if role == "teacher":
            state.teacher_model = generation.model
            state.waiting = [PendingCall("student", GenRequest(prompt=f"Student, about the {state.problem.question}:"))]
        else:
            state.student_tokens = list(generation.token_ids)
            good = self.planted.get(generation.model, frozenset())
            low = sum(t in good for t in state.student_tokens) / max(len(state.student_tokens), 1)
            state.prediction = f"{state.teacher_model}|{low}"
            state.finished = True

    def gold(self, problem) -> str:
        return ""

    def score(self, problem, prediction):
        teacher, low = (prediction or "|0").split("|")
        s = 0.5 * (teacher == GOOD_TEACHER) + 0.5 * float(low)
        return s, s


def toy_workflow(pool: ModelPool) -> ToyRLWorkflow:
    wf = ToyRLWorkflow()
    wf.planted = planted_tokens(pool)
    return wf


def toy_problems(n: int = 20) -> list[Problem]:
    return [Problem(id=f"toy{i}", task="toy-rl", question=f"{WORDS[i % len(WORDS)]} number {i}", gold="")
            for i in range(n)]


def sharpened(local, scale: float = 30.0):
    """A copy of a tiny random LocalModel whose output embedding is ``scale`` times larger: its next-token
    distributions are peaked enough (instead of near uniform) for an adapter to move them."""
    import copy

    from haps.models.local import LocalModel
    from haps.models.lora import detach_lora

    model = copy.deepcopy(local.model)
    detach_lora(model)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)  # tied: the input embedding too (its scale is normed away)
    return LocalModel(local.spec, model, local.tokenizer)


def toy_pool(tiny_llama, tiny_gemma3, target: LoraTarget | None = None, closed: bool = False,
             sharpen: float | None = None) -> ModelPool:
    """The two tiny random models as a pool (``closed``: tiny-gemma3 pretends to be a closed model;
    ``sharpen``: copies with peaked distributions, see `sharpened`)."""
    target = target or LoraTarget(last_k_layers=1, rank=4, alpha=1.0)
    if sharpen is not None:
        tiny_llama, tiny_gemma3 = sharpened(tiny_llama, sharpen), sharpened(tiny_gemma3, sharpen)
    specs = [ModelSpec(name="tiny-llama", source_kind="folder", source="/nonexistent", price_in=1, price_out=1),
             ModelSpec(name="tiny-gemma3", source_kind="folder", source="/nonexistent", price_in=2, price_out=2,
                       open_weights=not closed)]
    return ModelPool(PoolConfig(name="toy", models=specs, lora=target),
                     backends={"tiny-llama": tiny_llama, "tiny-gemma3": tiny_gemma3})


def tiny_backbone(tok, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.02, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg)


def toy_router(tok, pool: ModelPool, workflow: Workflow, low: LowLevelConfig | None = None,
               seed: int = 0) -> HierarchicalRouter:
    high = HighLevelRouter(tiny_backbone(tok, seed), tok, space_for(workflow, pool), HighLevelRouterConfig(batch_size=8))
    target = pool.config.lora
    sites = {m.name: pool.backend(m.name).lora_sites(target) for m in pool.config.models if m.open_weights}
    return HierarchicalRouter.build(high, sites, target, low or LowLevelConfig(), seed=seed)
