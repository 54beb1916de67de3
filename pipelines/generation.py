"""Candidate generation: N programs per problem from a model (`transformers`,
`vllm`) or from semantic mutations of the reference solution (`mutation`).

A sample's `code` is the prompt plus the completion cut at the language's first
stop sequence (MultiPL-E's stops), a whole unit the sandbox appends tests to.
In C++, Java, C# and Bash the stop is the closing of the prompt's function, and
`code` keeps that closing line: the sandbox puts its C++ prologue between code
and tests, so code must not end inside a function. (MultiPL-E's own tests for
these languages begin with that closing line; they need it dropped on import.)

The prompt format has one home here: `prompt_ids` (the tokens the model continues,
chat-wrapped or not as `prompt_style` says) and `continuation` (what a reply adds to
the prompt). The policy update trains and judges its rollouts with the same two.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from models.enums import Language
from models.settings import BUNDLED_MODEL
from pipelines.mutation import mutants

BACKENDS = ("transformers", "vllm", "mutation")
PROMPT_STYLES = ("auto", "chat", "completion")

# MultiPL-E-style stops. "\n```" ends a fenced block that instruct models like
# to close even in completion mode.
STOP_SEQUENCES: dict[Language, tuple[str, ...]] = {
    Language.PYTHON: (
        "\ndef ",
        "\nclass ",
        "\nif __name__",
        "\nprint(",
        "\n#",
        "\nassert ",
        "\n@",
        "\n```",
    ),
    Language.JAVASCRIPT: (
        "\nfunction ",
        "\n/*",
        "\n//",
        "\nconsole.log",
        "\nmodule.exports",
        "\nconst assert",
        "\n```",
    ),
    Language.TYPESCRIPT: (
        "\nfunction ",
        "\n/*",
        "\n//",
        "\nconsole.log",
        "\nexport ",
        "\ndeclare ",
        "\n```",
    ),
    Language.PHP: ("\nfunction", "\n?>", "\n//", "\n#", "\n```"),
    Language.CPP: ("\n}", "\n```"),
    Language.JAVA: ("\n    }\n", "\n}", "\n```"),
    Language.CSHARP: ("\n    }\n", "\n}", "\n```"),
    Language.BASH: ("\n}", "\n```"),
}

# Stops that close the prompt's function: the code keeps them, minus the newline after.
_FUNCTION_CLOSINGS = ("\n}", "\n    }\n")

# The line of a prompt that declares the function to complete; its name lets
# us find the same function in a chat reply.
_FUNCTION_HEADER: dict[Language, re.Pattern[str]] = {
    Language.PYTHON: re.compile(r"^[ \t]*(?:async\s+)?def\s+(\w+)\s*\(.*$", re.M),
    Language.JAVASCRIPT: re.compile(r"^.*\bfunction\s+(\w+)\s*\(.*$", re.M),
    Language.TYPESCRIPT: re.compile(r"^.*\bfunction\s+(\w+)\s*[(<].*$", re.M),
    Language.PHP: re.compile(r"^.*\bfunction\s+(\w+)\s*\(.*$", re.M),
    Language.CPP: re.compile(r"^[^;#/]*?(\w+)\s*\([^;]*\)\s*(?:const\s*)?\{\s*$", re.M),
    Language.JAVA: re.compile(r"^[^;/]*?(\w+)\s*\([^;]*\)\s*(?:throws [\w., ]+)?\{\s*$", re.M),
    Language.CSHARP: re.compile(r"^[^;/]*?(\w+)\s*\([^;]*\)\s*\{\s*$", re.M),
    Language.BASH: re.compile(r"^\s*(?:function\s+)?(\w+)\s*\(\)\s*\{?\s*$", re.M),
}
_FENCED_BLOCK = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.S)


def parse_language(value: str) -> Language:
    """The `Language` named by `value`, or a ValueError listing the known ones."""
    try:
        return Language(value)
    except ValueError:
        known = ", ".join(language.value for language in Language)
        raise ValueError(f"unknown language {value!r} (known: {known})") from None


@dataclass
class GenerationConfig:
    """How candidates are sampled; the same config serves CPU and GPU runs."""

    backend: str = field(
        default="transformers",
        metadata={"help": "'transformers' (CPU or GPU), 'vllm' (GPU, extra .[gpu]) or 'mutation'."},
    )
    model: str = field(
        default=BUNDLED_MODEL,
        metadata={
            "help": "Model spec: bundled:smollm2, a saved folder, a .gguf file or a cached id."
        },
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Most tokens generated per sample."})
    temperature: float = field(
        default=0.8, metadata={"help": "Sampling temperature; 0 means greedy decoding."}
    )
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling probability mass."})
    batch_size: int = field(
        default=16,
        metadata={"help": "Sequences per model.generate call, prompts x samples across problems."},
    )
    prompt_style: str = field(
        default="auto",
        metadata={
            "help": "'chat' wraps the prompt in the model's chat template, 'completion' continues "
            "it as text, 'auto' uses chat when the tokenizer has a template."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for sampling and for mutation order."})
    gpu_memory_fraction: float = field(
        default=0.4,
        metadata={
            "help": "vllm: share of GPU memory it reserves (weights and KV cache). The GPU "
            "worker also trains, in the same process, so vLLM must not take the card."
        },
    )

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_fraction <= 1:
            fraction = self.gpu_memory_fraction
            raise ValueError(f"gpu_memory_fraction must be in (0, 1], not {fraction}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown generation backend {self.backend!r} (known: {BACKENDS})")
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"unknown prompt_style {self.prompt_style!r} (known: {PROMPT_STYLES})")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be at least 1")


@dataclass(frozen=True)
class PromptSpec:
    """What a generator needs of a problem."""

    problem_id: int
    language: str
    prompt: str
    reference_solution: str | None = None

    def __post_init__(self) -> None:
        parse_language(self.language)

    @classmethod
    def from_problem(cls, problem: Any) -> "PromptSpec":
        """From a `models.Problem` row (or anything with its attributes)."""
        return cls(
            problem_id=problem.id,
            language=str(problem.language),
            prompt=problem.prompt,
            reference_solution=problem.reference_solution,
        )


@dataclass(frozen=True)
class Sample:
    """One candidate: `code` is what the store keeps and the sandbox runs."""

    code: str
    completion: str
    num_tokens: int


class Generator(Protocol):
    def generate(self, prompts: Sequence[PromptSpec], n: int) -> list[list[Sample]]:
        """One list of n samples per prompt, in order (mutation may return fewer)."""
        ...


def make_generator(config: GenerationConfig) -> Generator:
    """The backend `config.backend` names; models load here, once."""
    if config.backend == "transformers":
        return TransformersGenerator(config)
    if config.backend == "vllm":
        return VLLMGenerator(config)
    return MutationGenerator(config)


# --- shared text handling ---------------------------------------------------


def cut_at_stop(completion: str, language: Language) -> str:
    """The completion up to its first stop sequence; a function closing stays in."""
    cut, kept = len(completion), ""
    for stop in STOP_SEQUENCES[language]:
        index = completion.find(stop)
        if index != -1 and index < cut:
            cut, kept = index, stop.rstrip("\n") if stop in _FUNCTION_CLOSINGS else ""
    return completion[:cut] + kept


def completion_from_reply(reply: str, prompt: str, language: Language) -> str:
    """The part of a chat reply that continues `prompt`: the body of the prompt's
    function, taken from the fenced block that defines it (or the whole reply)."""
    blocks = _FENCED_BLOCK.findall(reply) or [reply]
    header = _FUNCTION_HEADER[language]
    headers = list(header.finditer(prompt))
    name = headers[-1].group(1) if headers else None
    for block in blocks:
        for match in header.finditer(block):
            if match.group(1) == name:
                return block[match.end() :].removeprefix("\n")
    body = max(blocks, key=len)
    if language == Language.PYTHON and body.strip() and not body[:1].isspace():
        # A bare body at column 0 would end the function; indent it under it.
        body = "".join(f"    {line}" if line.strip() else line for line in body.splitlines(True))
    return body


def continuation(reply: str, prompt: str, language: Language, chat: bool) -> str:
    """What a model's reply adds to `prompt` (from a chat reply, the body of the
    prompt's function), cut at the first stop: a candidate's code is prompt + this.
    The policy update judges its rollouts by the same cut."""
    completion = completion_from_reply(reply, prompt, language) if chat else reply
    return cut_at_stop(completion, language)


def _sample(prompt: PromptSpec, reply: str, chat: bool, num_tokens: int) -> Sample:
    cut = continuation(reply, prompt.prompt, Language(prompt.language), chat)
    return Sample(code=prompt.prompt + cut, completion=cut, num_tokens=num_tokens)


def _chat_messages(prompt: PromptSpec) -> list[dict[str, str]]:
    return [
        {
            "role": "user",
            "content": f"Complete this {prompt.language} function. Reply with the whole "
            f"function in one fenced code block.\n\n```{prompt.language}\n{prompt.prompt}\n```",
        }
    ]


def uses_chat(style: str, tokenizer: Any) -> bool:
    """Whether `style` ('auto', 'chat' or 'completion') wraps prompts in the chat template."""
    has_template = bool(tokenizer.chat_template)
    if style == "chat" and not has_template:
        raise ValueError("prompt_style='chat' but the model's tokenizer has no chat template")
    return style == "chat" or (style == "auto" and has_template)


def model_input(prompt: PromptSpec, chat: bool, tokenizer: Any) -> str:
    """The text the model continues for `prompt`: chat-wrapped or as is."""
    if not prompt.prompt.strip():
        raise ValueError(f"problem {prompt.problem_id}: empty prompt")
    if not chat:
        return prompt.prompt
    return tokenizer.apply_chat_template(
        _chat_messages(prompt), tokenize=False, add_generation_prompt=True
    )


def prompt_ids(prompt: PromptSpec, chat: bool, tokenizer: Any) -> list[int]:
    """The token ids the model continues for `prompt`: what generation feeds it, and
    the query the policy update trains on."""
    # A chat template writes its own special tokens; and a chat model's BOS is
    # often its turn marker (SmolLM2: <|im_start|>), which would make a
    # plain-code prompt read as a speaker's name. Only base models get BOS.
    add_special_tokens = not tokenizer.chat_template
    text = model_input(prompt, chat, tokenizer)
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def reply_text(tokenizer: Any, tokens: Sequence[int]) -> tuple[str, int]:
    """Text and length of one generated row, up to its first EOS or padding."""
    ends = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    length = next((k for k, token in enumerate(tokens) if token in ends), len(tokens))
    return tokenizer.decode(tokens[:length], skip_special_tokens=True), length


def _check_n(n: int) -> None:
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")


# --- transformers -----------------------------------------------------------


class TransformersGenerator:
    """Batches prompts x n sequences across problems into few `generate` calls.

    Each batch holds one language (stop strings are per call) and prompts of
    similar length (less left padding)."""

    def __init__(self, config: GenerationConfig, *, model: Any = None, tokenizer: Any = None):
        import torch

        from pipelines.loading import load_causal_lm, load_tokenizer

        self.config = config
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
        self.tokenizer.padding_side = "left"  # decoder-only models continue the right edge
        if model is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            model = load_causal_lm(config.model, dtype=dtype).to(device)
        self.model = model.eval()
        self.chat = uses_chat(config.prompt_style, self.tokenizer)
        self.tokens_generated = 0  # running total, read by the benchmark
        # Building a StopStringCriteria scans the whole vocabulary (~1 s); do it
        # once per language rather than once per generate call.
        self._stop_criteria: dict[str, Any] = {}

    def generate(self, prompts: Sequence[PromptSpec], n: int) -> list[list[Sample]]:
        import torch

        _check_n(n)
        inputs = [prompt_ids(prompt, self.chat, self.tokenizer) for prompt in prompts]
        order = sorted(
            (i for i in range(len(prompts)) for _ in range(n)),
            key=lambda i: (prompts[i].language, len(inputs[i])),
        )
        torch.manual_seed(self.config.seed)
        results: list[list[Sample]] = [[] for _ in prompts]
        size = self.config.batch_size
        for start in range(0, len(order), size):
            batch = order[start : start + size]
            # A batch spans at most a few languages; split so each call has one stop set.
            for language in dict.fromkeys(prompts[i].language for i in batch):
                rows = [i for i in batch if prompts[i].language == language]
                for i, (reply, count) in zip(
                    rows, self._generate_batch(rows, inputs, language), strict=True
                ):
                    results[i].append(_sample(prompts[i], reply, self.chat, count))
        return results

    def model_inputs(self, prompts: Sequence[PromptSpec]) -> list[str]:
        """The text the model continues for each prompt (chat-wrapped or as is)."""
        return [model_input(prompt, self.chat, self.tokenizer) for prompt in prompts]

    def _generate_batch(
        self, rows: list[int], inputs: list[list[int]], language: str
    ) -> list[tuple[str, int]]:
        import torch

        encoded = self.tokenizer.pad(
            {"input_ids": [inputs[i] for i in rows]}, return_tensors="pt"
        ).to(self.model.device)
        sampling = self.config.temperature > 0
        with torch.inference_mode():
            output = self.model.generate(
                **encoded,
                max_new_tokens=self.config.max_new_tokens,
                do_sample=sampling,
                temperature=self.config.temperature if sampling else None,
                top_p=self.config.top_p if sampling else None,
                stopping_criteria=self._stopping_criteria(language),
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new_tokens = output[:, encoded["input_ids"].shape[1] :]
        return [self._decode(row) for row in new_tokens]

    def _stopping_criteria(self, language: str) -> Any:
        from transformers import StoppingCriteriaList, StopStringCriteria

        if self.chat:  # chat replies hold prose around the code: only EOS ends them
            return StoppingCriteriaList()
        if language not in self._stop_criteria:
            stops = STOP_SEQUENCES[Language(language)]
            self._stop_criteria[language] = StopStringCriteria(self.tokenizer, stops)
        return StoppingCriteriaList([self._stop_criteria[language]])

    def _decode(self, tokens: Any) -> tuple[str, int]:
        text, length = reply_text(self.tokenizer, tokens.tolist())
        self.tokens_generated += length
        return text, max(length, 1)


# --- vLLM -------------------------------------------------------------------


class VLLMGenerator:
    """One `LLM.generate` call for all prompts; vLLM batches and stops per request."""

    def __init__(self, config: GenerationConfig):
        try:
            import vllm
        except ImportError as error:
            raise ImportError(
                "the 'vllm' backend needs vLLM, which is in the optional extra: "
                "pip install '.[gpu]' (on a GPU machine)"
            ) from error
        from pipelines.loading import load_tokenizer, resolve_model

        self.config = config
        self.vllm = vllm
        self.tokenizer = load_tokenizer(config.model)
        self.chat = uses_chat(config.prompt_style, self.tokenizer)
        source = resolve_model(config.model)
        location = f"{source.location}/{source.gguf_file}" if source.gguf_file else source.location
        self.llm = vllm.LLM(
            model=location,
            tokenizer=source.location,
            seed=config.seed,
            gpu_memory_utilization=config.gpu_memory_fraction,
        )

    def sampling_params(self, prompt: PromptSpec, n: int) -> Any:
        return self.vllm.SamplingParams(
            n=n,
            temperature=self.config.temperature,
            top_p=self.config.top_p if self.config.temperature > 0 else 1.0,
            max_tokens=self.config.max_new_tokens,
            stop=None if self.chat else list(STOP_SEQUENCES[Language(prompt.language)]),
            seed=self.config.seed,
        )

    def generate(self, prompts: Sequence[PromptSpec], n: int) -> list[list[Sample]]:
        _check_n(n)
        if not prompts:
            return []
        texts = [model_input(prompt, self.chat, self.tokenizer) for prompt in prompts]
        params = [self.sampling_params(prompt, n) for prompt in prompts]
        outputs = self.llm.generate(texts, params)
        results = []
        for prompt, output in zip(prompts, outputs, strict=True):
            results.append(
                [
                    _sample(prompt, choice.text, self.chat, max(len(choice.token_ids), 1))
                    for choice in output.outputs
                ]
            )
        return results


# --- mutation ---------------------------------------------------------------


class MutationGenerator:
    """Near-miss candidates from the mutation engine (`pipelines.mutation`): single
    (then double) semantic mutations of the reference solution. A prompt without a
    reference gets no samples."""

    def __init__(self, config: GenerationConfig):
        self.config = config

    def generate(self, prompts: Sequence[PromptSpec], n: int) -> list[list[Sample]]:
        _check_n(n)
        return [self._mutants(prompt, n) for prompt in prompts]

    def _mutants(self, prompt: PromptSpec, n: int) -> list[Sample]:
        reference = prompt.reference_solution
        if not reference or not reference.strip():
            return []
        codes = mutants(
            reference,
            Language(prompt.language),
            n,
            seed=f"{self.config.seed}:{prompt.problem_id}",
            floor=len(prompt.prompt) if reference.startswith(prompt.prompt) else 0,
            problem_id=prompt.problem_id,
        )
        return [_mutant_sample(prompt, code) for code in codes]


def _mutant_sample(prompt: PromptSpec, code: str) -> Sample:
    completion = code[len(prompt.prompt) :] if code.startswith(prompt.prompt) else code
    return Sample(code=code, completion=completion, num_tokens=0)
