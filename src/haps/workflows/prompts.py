"""Prompts of the two Teacher/Student systems, in our own words, with the structure and output
formats of the paper's Figures 6-11.

Each prompt has two renderings:

* chat (instruction-tuned models): the worked example as a first user/assistant exchange (one-shot),
  then one user message with an ``[INPUT]`` block and an ``[OUTPUT REQUIREMENTS]``
  block with the exact output format (as in the paper);
* completion (base models, ``ModelSpec.completion_style``): the same instructions without
  placeholders, one worked example, then the real inputs, ending with the first output label
  ("Thought:", "Summary:", "Rationale:", "Feedback:") for the model to continue; stop strings end the
  output before the model starts inventing the next input block.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from haps.models.types import GenRequest
from haps.workflows.base import Style


@dataclass(frozen=True)
class PromptTemplate:
    """One agent prompt. ``inputs`` are (label, key) pairs filled from the caller's values."""

    intro: str
    inputs: tuple[tuple[str, str], ...]
    output_format: str  # chat: the format with <placeholders>
    completion_format: str  # completion: the same rule in words (no placeholders to echo)
    answer_prefix: str  # the first output label, e.g. "Thought:"
    example: dict[str, str]  # input key -> value, plus "output" (text after answer_prefix)
    chat_stops: tuple[str, ...] = ()
    extra_stops: tuple[str, ...] = ()
    token_hint: int = 256

    def _inputs(self, values: dict[str, str], sep: str = "\n") -> str:
        lines = []
        for label, key in self.inputs:
            v = str(values.get(key, "")).strip()
            lines.append(f"{label}:\n{v}" if "\n" in v else f"{label}: {v}")
        return sep.join(lines)

    def chat_text(self, values: dict[str, str]) -> str:
        blocks = [self.intro.strip(), "[INPUT]", self._inputs(values, "\n\n"), "[OUTPUT REQUIREMENTS]",
                  self.output_format.strip(), f"Keep your whole reply within {self.token_hint} tokens."]
        return "\n\n".join(blocks)

    def completion_text(self, values: dict[str, str]) -> str:
        ex = self.example
        return (
            f"{self.intro.strip()}\n\n{self.completion_format.strip()}\n\n"
            f"### Example\n{self._inputs(ex)}\n{self.answer_prefix} {ex['output'].strip()}\n\n"
            f"### Task\n{self._inputs(values)}\n{self.answer_prefix}"
        )

    def completion_stops(self) -> list[str]:
        stops = ["\n\n", "\n###"] + [f"\n{label}:" for label, _ in self.inputs]
        return stops + [s for s in self.extra_stops if s not in stops]

    def chat_messages(self, values: dict[str, str], example: bool = True) -> list[dict[str, str]]:
        """Chat rendering. With ``example`` the worked example comes first as a user turn and the
        assistant's reply in the exact output format (one-shot): small instruction-tuned models follow
        the format far more often than from the instructions alone."""
        msgs = []
        if example:
            msgs += [{"role": "user", "content": self.chat_text(self.example)},
                     {"role": "assistant", "content": f"{self.answer_prefix} {self.example['output'].strip()}"}]
        return msgs + [{"role": "user", "content": self.chat_text(values)}]

    def request(self, style: Style, values: dict[str, str], tag: str = "", chat_example: bool = True) -> GenRequest:
        """The call's request. Prompts that grow with the rounds (summaries, memory, feedback) may outgrow a
        model's context window: ``truncation="middle"`` then cuts their middle tokens (the instructions and the
        worked example at the start, the question and the answer prefix at the end stay), so an episode never
        fails on length."""
        if style == "completion":
            return GenRequest(prompt=self.completion_text(values), stop=self.completion_stops(), tag=tag,
                              truncation="middle")
        return GenRequest(messages=self.chat_messages(values, chat_example), stop=list(self.chat_stops), tag=tag,
                          truncation="middle")

    def full_output(self, style: Style, text: str) -> str:
        """The model's text as a parser should see it: completion outputs get their label back."""
        if style == "completion" and not text.lstrip().lower().startswith(self.answer_prefix.lower()):
            return f"{self.answer_prefix} {text.strip()}"
        return text


# ====================================================================== HotpotQA (Figures 6-9)
FIRST_CONTEXT = "Nothing yet: this is the first step."
START_OBSERVATION = "Start to answer the question."
BUDGET_OPEN = "You can search at this step."
BUDGET_CLOSED = "You have no search budget left. You must give the final answer now with Finish[answer]."

_EX_Q = 'In which city was the composer of "The Planets" born?'
_EX_PASSAGE_1 = ("The Planets: The Planets, Op. 32, is an orchestral suite in seven movements by the English "
                 "composer Gustav Holst, written between 1914 and 1917.")
_EX_PASSAGE_2 = ("Gustav Holst: Gustav Holst (born 21 September 1874 in Cheltenham, Gloucestershire) was an "
                 "English composer, arranger and teacher.")

HOTPOT_STUDENT = PromptTemplate(
    intro="""You are the Student agent. You answer the question with the guidance of the Teacher agent and the information you find. Make a sensible plan first, then choose one action.

Context is a summary of the interaction so far.
Question is the question you must answer.
Observation is your last action with its result, and the Teacher's advice on it.
Budget tells you whether you may still search or must answer now.
Thought is your reasoning about the situation and about which action to take.
Action is one of two kinds:
(1) Search[entity]: ask a local search engine for information about the entity.
(2) Finish[answer]: give the final answer and end the task.

Notes:
If you need more information to answer, use Search[entity].
If you have enough information, use Finish[answer].
If the answer could be ambiguous, give its fuller form: "film director" is better than "director".
Keep the answer short and exact, not a sentence. Answer a yes/no question with "yes" or "no".
Mind the budget: when it says you must answer, use Finish[answer].""",
    inputs=(("Context", "context"), ("Question", "question"), ("Observation", "observation"),
            ("Budget", "budget")),
    output_format="""Your reply must follow exactly this format:

Thought: <your reasoning about which action to take>

Action: <Search[entity] or Finish[answer]>

Begin your thought with "Thought:" and your action with "Action:".""",
    completion_format='Reply with one line that starts with "Thought:" and then one line that starts with '
                      '"Action:" holding Search[entity] or Finish[answer].',
    answer_prefix="Thought:",
    example={"context": FIRST_CONTEXT, "question": _EX_Q, "observation": START_OBSERVATION,
             "budget": BUDGET_OPEN,
             "output": "I need to find who composed The Planets, then where that composer was born.\n"
                       "Action: Search[The Planets]"},
    # "]" closes the action (the official code also cuts the action at its first "]"); small models
    # otherwise go on to invent the search result
    chat_stops=("]", "\nObservation:", "\nQuestion:", "\nContext:"),
    extra_stops=("]", "\nThought:"),
)

# the worked example shown to base models on the last round (no budget): a Finish
HOTPOT_STUDENT_FINAL = replace(
    HOTPOT_STUDENT,
    example={
        "context": "The Student searched The Planets and learned that Gustav Holst composed it. The Teacher "
                   "advised finding where Holst was born.",
        "question": _EX_Q,
        "observation": f"Search Result: Search[Gustav Holst] {_EX_PASSAGE_2} Teacher's Advice: [Continue] "
                       "The search says Holst was born in Cheltenham, which answers the question.",
        "budget": BUDGET_CLOSED,
        "output": "The composer of The Planets is Gustav Holst, and he was born in Cheltenham.\n"
                  "Action: Finish[Cheltenham]",
    },
)

HOTPOT_TEACHER = PromptTemplate(
    intro="""You are the Teacher agent. You guide the Student agent towards the answer of the question. Judge whether the Student's last step helps logically, explain your analysis and choose your action. You may also advise the Student on the next step.

Context is a summary of the interaction so far.
Question is the question the Student must answer.
Observation is your previous advice and what the Student did after it.
Thought is your analysis of the situation and of the action to take.
Action is one of two kinds:
(1) [Continue]: the Student's step was sound and the Student should go on.
(2) [Rethink]: the Student's step was wrong and the Student should try another step.

Notes:
You may check whether the Student's action was right, sum up the useful facts found so far, or suggest the next steps.
Your action is exactly one of [Continue] or [Rethink]. Be an encouraging teacher: unless the Student is clearly wrong, prefer [Continue].""",
    inputs=(("Context", "context"), ("Question", "question"), ("Observation", "observation")),
    output_format="""Your reply must follow exactly this format:

Thought: <your analysis of the Student's step and your advice>

Action: <[Continue] or [Rethink]>

Begin your thought with "Thought:" and your action with "Action:". The action MUST be written inside square brackets "[]".""",
    completion_format='Reply with one line that starts with "Thought:" and then one line that starts with '
                      '"Action:" holding [Continue] or [Rethink].',
    answer_prefix="Thought:",
    example={"context": FIRST_CONTEXT, "question": _EX_Q,
             "observation": f"Student's Action: Search[The Planets] {_EX_PASSAGE_1}",
             "output": "The search shows that Gustav Holst composed The Planets. Next, the Student should search "
                       "Gustav Holst to find his birthplace.\nAction: [Continue]"},
    chat_stops=("\nObservation:", "\nQuestion:", "\nContext:"),
    extra_stops=("\nThought:",),
)


def _summary_template(role: str, duty: str, example_output: str, example_obs: str, example_thought: str,
                      example_action: str) -> PromptTemplate:
    return PromptTemplate(
        intro=f"""You are the {role} agent, and your task is to {duty}. You are given the previous summary and new messages that it does not cover yet. Write a new summary: merge the main points of the new messages into the previous summary to give a complete recap. Point out the key issues discussed, the decisions made and any actions asked for. Keep the useful facts returned by the search engine.""",
        inputs=(("Question", "question"), ("Previous Summary", "context"), ("New Observation", "observation"),
                ("New Thought", "thought"), ("New Action", "action")),
        output_format="""Your reply must follow exactly this format:

Summary: <the new summary built from this information>

Begin your summary with "Summary:".""",
        completion_format='Reply with one line that starts with "Summary:".',
        answer_prefix="Summary:",
        example={"question": _EX_Q, "context": FIRST_CONTEXT, "observation": example_obs,
                 "thought": example_thought, "action": example_action, "output": example_output},
        chat_stops=("\nQuestion:", "\nPrevious Summary:", "\nNew Observation:"),
    )


HOTPOT_STUDENT_SUMMARY = _summary_template(
    "Student", "answer the question under the guidance of the Teacher agent",
    example_output="To find the birthplace of the composer of The Planets, I searched The Planets and learned that "
                   "Gustav Holst composed it. Next I need Holst's birthplace.",
    example_obs=START_OBSERVATION,
    example_thought="I need to find who composed The Planets, then where that composer was born.",
    example_action=f"Search[The Planets] Search Result: {_EX_PASSAGE_1}",
)
HOTPOT_TEACHER_SUMMARY = _summary_template(
    "Teacher", "guide the Student agent to answer the question",
    example_output="The Student searched The Planets and found that Gustav Holst composed it. I approved the step "
                   "and advised searching Gustav Holst for his birthplace.",
    example_obs=f"Student's Action: Search[The Planets] {_EX_PASSAGE_1}",
    example_thought="The search shows that Gustav Holst composed The Planets. Next, the Student should search "
                    "Gustav Holst to find his birthplace.",
    example_action="[Continue]",
)

# the Student's last word when its last round ends without Finish (HotpotQAOptions.forced_answer="ask"):
# a short reading-comprehension call over the passages found (ours, not the paper's)
HOTPOT_ANSWER = PromptTemplate(
    intro="""You are the Student agent and your search budget is spent. Answer the question from the passages you found. Give only the answer: a short phrase copied from the passages (a name, a place, a date, a number), or "yes" or "no" for a yes/no question.""",
    inputs=(("Passages", "passages"), ("Question", "question")),
    output_format="""Your reply must follow exactly this format:

Answer: <the short answer>""",
    completion_format='Reply with one line that starts with "Answer:".',
    answer_prefix="Answer:",
    example={"passages": f"{_EX_PASSAGE_1} {_EX_PASSAGE_2}", "question": _EX_Q, "output": "Cheltenham"},
    chat_stops=("\n",),
    extra_stops=("\n",),
    token_hint=32,
)

# ====================================================================== MMLU (Figures 10-11)
FIRST_ROUND = "None yet: this is the first round."

_EX_MC = ("Which gas makes up most of the Earth's atmosphere?\nA. Oxygen\nB. Nitrogen\nC. Carbon dioxide\n"
          "D. Argon")
_EX_SOLUTION = ("Rationale: Dry air is about 78% nitrogen and 21% oxygen, so nitrogen is the largest part.\n"
                "Choice: B")

MMLU_STUDENT = PromptTemplate(
    intro="""You are the Student agent. Read a multiple-choice question and give the option most likely to be correct, revising your previous answer according to the Teacher agent's feedback.""",
    inputs=(("The multiple-choice question and its options", "question"),
            ("Your last choice and rationale", "last_solution"),
            ("The Teacher's feedback on your last choice", "last_feedback")),
    output_format="""Your reply must follow exactly this format:

Rationale: <your analysis of the question, using your previous rationale and the feedback>

Choice: <your final choice: A, B, C or D>

Begin your analysis with "Rationale:" and your choice with "Choice:".""",
    completion_format='Reply with one line that starts with "Rationale:" and then one line that starts with '
                      '"Choice:" holding one letter: A, B, C or D.',
    answer_prefix="Rationale:",
    example={"question": _EX_MC, "last_solution": FIRST_ROUND, "last_feedback": FIRST_ROUND,
             "output": _EX_SOLUTION.removeprefix("Rationale: ")},
    chat_stops=("\nThe multiple-choice question",),
    extra_stops=("\nRationale:",),
    token_hint=512,
)

MMLU_TEACHER = PromptTemplate(
    intro="""You are the Teacher agent. Review the Student agent's current answer to a multiple-choice question, give targeted feedback, and decide whether the answer is correct and ready to be submitted.""",
    inputs=(("The multiple-choice question and its options", "question"),
            ("The Student's current choice and rationale", "current_solution")),
    output_format="""Your reply must follow exactly this format:

Feedback: <your feedback on the Student's choice and rationale of this round>

Submit: <whether the choice is correct and can be submitted: 0 (not yet) or 1 (submit)>

Begin your feedback with "Feedback:" and your decision with "Submit:".""",
    completion_format='Reply with one line that starts with "Feedback:" and then one line that starts with '
                      '"Submit:" holding 1 (correct, submit it) or 0 (not yet).',
    answer_prefix="Feedback:",
    example={"question": _EX_MC, "current_solution": _EX_SOLUTION,
             "output": "Right: nitrogen is about 78% of dry air, far more than oxygen.\nSubmit: 1"},
    chat_stops=("\nThe multiple-choice question",),
    extra_stops=("\nFeedback:", "\nRationale:"),
    token_hint=512,
)

