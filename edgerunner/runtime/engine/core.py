"""The one place llama.cpp runs: a Llama configured from a RuntimePlan, generating one request at a
time with the model's own chat template, stop sequences, grammars and cancellation.

Only the scheduler's worker thread calls `load`, `unload` and `run`. `prepare` (template, tokenize,
grammar) uses a separate vocab-only model and may be called from any thread, so admission works
even while the weights are unloaded by keep_alive, and while they load again. json_schema
grammars are bounded and first built in a child process (runtime.engine.grammar): a schema that
would crash or stall llama.cpp does so there, not here.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
from llama_cpp import llama_chat_format, llama_grammar
from llama_cpp._internals import LlamaModel

from edgerunner.bundle.manifest import RuntimePlan
from edgerunner.errors import ModelError
from edgerunner.runtime.engine.batch import Batcher, Generation, sampler_chain
from edgerunner.runtime.engine.grammar import GrammarBuilder
from edgerunner.runtime.engine.prefix_store import PrefixStore, SavedPrefix
from edgerunner.runtime.engine.sampling import SamplingParams
from edgerunner.runtime.engine.tools import families
from edgerunner.runtime.engine.tools import grammar as tool_grammars
from edgerunner.runtime.engine.tools.events import Sink, ToolEvents
from edgerunner.runtime.engine.weights import BatchLlama, Opened, open_weights, served_plan
from edgerunner.runtime.protocol import (
    AnyRequest,
    ChatCompletionRequest,
    FinishReason,
    RequestError,
    ResponseFormat,
)

logger = logging.getLogger(__name__)

# the saved prefix files, being checked (PrefixStore.check) while the weights load
Checking = concurrent.futures.Future[list[tuple[Path, SavedPrefix]]]
# stands in for message i while rendering the chat template (private-use characters)
_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")


@dataclass
class Prepared:
    """A request turned into what llama.cpp needs: tokens, stops, grammar, sampling."""

    prompt_tokens: list[int]
    max_tokens: int
    stop: list[str]
    grammar: llama_grammar.LlamaGrammar | None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prompt_text: str = ""
    tool_grammar: tool_grammars.ToolGrammar | None = None  # holds the calls to the schemas
    tool_family: families.Family | None = None  # the answer's calls are read in this format

    def sink(self, sink: Sink) -> Sink:
        """Where the scheduler sends this request's events: through the family's call parser
        when the model may call tools (tool_choice "none" keeps the answer plain text)."""
        return sink if self.tool_family is None else ToolEvents(sink, self.tool_family)


@dataclass
class Outcome:
    """How a generation ended."""

    finish_reason: FinishReason | None  # None when should_stop interrupted it
    prompt_tokens: int
    completion_tokens: int
    text: str
    prompt_evaluated: int = 0  # prompt tokens in the context; fewer when stopped mid-prompt
    cached_tokens: int = 0  # of those, the ones the shared-prefix cache supplied


class Engine:
    """llama_cpp.Llama for one bundle; construction is cheap, `load()` maps the weights."""

    def __init__(
        self, model_path: Path, plan: RuntimePlan, *, name: str, n_threads: int | None = None,
        extra_bufts: bool = True, n_parallel: int | None = None,
        prefix_cache_cells: int | None = None, prefix_store: PrefixStore | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        self.plan = served_plan(plan, n_parallel=n_parallel,
                                prefix_cache_cells=prefix_cache_cells)
        self.name = name
        self.n_threads = n_threads
        self.extra_bufts = extra_bufts  # False: no AMX, no weight repacking (the preflight's)
        self._batcher: Batcher | None = None
        self._llm: BatchLlama | None = None
        self._vocab_only: LlamaModel | None = None
        self._formatter: Callable[..., llama_chat_format.ChatFormatterResponse] | None = None
        self._chat_template: _ChatTemplate | None = None  # the template text, for tools
        self._lock = threading.RLock()  # guards swapping the model under the tokenizer
        self._load_lock = threading.Lock()  # one load or unload at a time; admission never waits
        self.load_seconds = 0.0  # the last load: llama.cpp's model and context
        self.warm_up_seconds = 0.0  # the last warm-up decode (`warm_up`)
        self.restore_seconds = 0.0  # restoring the saved prefix cache
        self.grammars = GrammarBuilder(self.model_path)  # json_schema: bounded, child-built
        self.prefix_store = prefix_store  # the prefix cache saved at unload, restored at load

    @property
    def n_ctx(self) -> int:
        """The context window admission checks against (the plan's, possibly shrunk)."""
        return self.plan.n_ctx

    @property
    def loaded(self) -> bool:
        return self._llm is not None

    @contextlib.contextmanager
    def _vocab(self) -> Iterator[LlamaModel]:
        """The loaded model's vocabulary, or a vocab-only copy while the weights are unloaded."""
        with self._lock:
            if self._llm is not None:
                model: LlamaModel = self._llm._model
            else:
                if self._vocab_only is None:
                    self._vocab_only = self._open_vocab_only()
                model = self._vocab_only
            if self._formatter is None:
                self._formatter = self._make_formatter(model)
            yield model

    def _open_vocab_only(self) -> LlamaModel:
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        try:
            return LlamaModel(path_model=str(self.model_path), params=params, verbose=False)
        except ValueError as exc:
            raise ModelError(f"llama.cpp cannot read {self.model_path}: {exc}",
                             "verify the bundle with `edgerunner verify`") from exc

    def load(self, opening: concurrent.futures.Future[Opened] | None = None) -> None:
        """Load the weights and create the context as the plan says; `opening`: the daemon's
        start-up already began that (`weights.open_in_background` with this engine's plan)."""
        with self._load_lock:
            if self._llm is not None:
                return
            # the saved prefix files are read and hashed while llama.cpp reads the weights
            checking = self._check_prefixes()
            # outside self._lock: admission tokenizes with the vocab-only copy meanwhile,
            # however long the weights take to map
            try:
                opened = opening.result() if opening is not None else self._open_model()
            except (ValueError, RuntimeError) as exc:
                raise ModelError(f"llama.cpp failed to load {self.model_path}: {exc}",
                                 "check free memory and the bundle's plan (n_ctx, kv_type)"
                                 ) from exc
            llm, started = opened.llm, time.perf_counter()
            self.load_seconds = opened.seconds
            batcher = self._open_batcher(llm)
            self._restore_prefixes(llm, batcher, checking)
            self.restore_seconds = time.perf_counter() - started
            # the chat template compiled now, not on the first request (a restart's TTFT)
            formatter = self._formatter or self._make_formatter(llm._model)
            with self._lock:
                self._llm, self._batcher = llm, batcher
                self._formatter = self._formatter or formatter
                # the full model carries its own vocabulary; a second copy would only cost RSS
                vocab_only, self._vocab_only = self._vocab_only, None
            if vocab_only is not None:
                vocab_only.close()  # swapped out under the lock: nobody is using it
        logger.info("model loaded", extra={
            "event": "model_loaded", "seconds": round(self.load_seconds, 3),
            "restore_s": round(self.restore_seconds, 3),
            "n_ctx": self.plan.n_ctx, "kv_type": self.plan.kv_type})

    def warm_up(self) -> None:
        """Start llama.cpp's thread team on the calling thread, the one that will decode (the
        scheduler's worker), with a decode stopped at once (Batcher.warm_up): otherwise the
        first request's TTFT would pay for it. Nothing if the weights are not loaded."""
        with self._lock:
            batcher = self._batcher
        if batcher is None or batcher.active:
            return
        started = time.perf_counter()
        batcher.warm_up()
        self.warm_up_seconds = time.perf_counter() - started
        logger.info("warm-up decode", extra={"event": "warm_up",
                                             "seconds": round(self.warm_up_seconds, 3)})

    @property
    def n_parallel(self) -> int:
        return self.plan.n_parallel

    @property
    def prefix_cache_cells(self) -> int:
        return self.plan.prefix_cache_cells

    def _open_model(self) -> Opened:
        return open_weights(self.model_path, self.plan, self.n_threads, self.extra_bufts)

    def _open_batcher(self, llm: BatchLlama) -> Batcher:
        cache_ids = list(range(self.n_parallel, self.plan.n_seq_max))
        return Batcher(llm._model, llm._ctx, n_ctx=llm.n_ctx(), n_batch=llm.n_batch,
                       n_parallel=self.n_parallel, cache_seq_ids=cache_ids,
                       cache_cells=min(self.prefix_cache_cells, llm.n_ctx()))

    def _check_prefixes(self) -> Checking | None:
        if self.prefix_store is None:
            return None
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edgerunner-prefixes")
        checking = pool.submit(self.prefix_store.check, self.plan)
        pool.shutdown(wait=False)  # its one thread ends with the check
        return checking

    def _restore_prefixes(self, llm: BatchLlama, batcher: Batcher,
                          checking: Checking | None) -> None:
        if self.prefix_store is None or checking is None:
            return
        try:
            self.prefix_store.restore(llm.ctx, batcher.cache, checking.result(), llm.n_ctx())
        except Exception:  # a cache is never a reason to fail a load
            logger.exception("prefix cache restore failed")

    def _save_prefixes(self, llm: BatchLlama | None, batcher: Batcher) -> None:
        if self.prefix_store is None or llm is None:
            return
        try:
            self.prefix_store.save(llm.ctx, batcher.cache, self.plan)
        except Exception:  # a cache is never a reason to fail an unload
            logger.exception("prefix cache save failed")

    def set_threads(self, n_threads: int) -> None:
        """Change decode threads between requests (the thermal governor's lever)."""
        self.n_threads = n_threads
        if self._llm is not None and self._llm.n_threads != n_threads:
            llama_cpp.llama_set_n_threads(self._llm.ctx, n_threads, n_threads)
            self._llm.n_threads = self._llm.n_threads_batch = n_threads

    def unload(self) -> None:
        """Free the weights and the KV cache (admission then uses a vocab-only copy)."""
        with self._load_lock:
            with self._lock:
                llm, self._llm = self._llm, None
                batcher, self._batcher = self._batcher, None
            if batcher is not None:
                self._save_prefixes(llm, batcher)
                batcher.clear()
                batcher.close()
            if llm is not None:
                llm.close()  # swapped out under the lock: nobody is using it
        if llm is not None:
            logger.info("model unloaded", extra={"event": "model_unloaded"})

    def close(self) -> None:
        """Free everything."""
        self.unload()
        with self._lock:
            vocab_only, self._vocab_only = self._vocab_only, None
            if vocab_only is not None:
                vocab_only.close()

    # -- preparing a request (any thread) ---------------------------------------------------

    def _make_formatter(
        self, vocab: LlamaModel
    ) -> Callable[..., llama_chat_format.ChatFormatterResponse]:
        metadata = vocab.metadata()
        template = metadata.get("tokenizer.chat_template")
        if not template:
            logger.warning("model has no chat template; using chatml")
            return llama_chat_format.format_chatml
        eos_id, bos_id = vocab.token_eos(), vocab.token_bos()
        return llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=vocab.token_get_text(eos_id) if eos_id != -1 else "",
            bos_token=vocab.token_get_text(bos_id) if bos_id != -1 else "",
            stop_token_ids=[eos_id],
        )

    def count_tokens(self, text: str) -> int:
        """Tokens in raw text (with BOS if the model adds one)."""
        return len(self._tokenize(text, add_bos=True, special=False))

    def _tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            lone = f"\\u{ord(exc.object[exc.start]):04x}"
            raise RequestError("invalid_request",
                               f"the text contains a lone UTF-16 surrogate ({lone}); send valid "
                               "Unicode") from exc
        with self._vocab() as vocab:
            return list(vocab.tokenize(data, add_bos=add_bos, special=special))

    def render_chat(self, request: ChatCompletionRequest) -> tuple[str, list[str], bool]:
        """The chat template applied to the messages: (prompt, template stops, added_special)."""
        result = self._render(request, [m.text() for m in request.messages])
        stops = [] if result.stop is None else (
            [result.stop] if isinstance(result.stop, str) else list(result.stop))
        return result.prompt, stops, bool(result.added_special)

    def _render(self, request: ChatCompletionRequest,
                contents: list[str]) -> llama_chat_format.ChatFormatterResponse:
        if request.uses_tools:
            return self._render_tools(request, contents)
        with self._vocab():
            formatter = self._formatter
        assert formatter is not None
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": content}
            for m, content in zip(request.messages, contents, strict=True)
        ]
        try:
            return formatter(messages=messages)
        except Exception as exc:  # jinja templates raise whatever they like
            raise RequestError("invalid_request",
                               f"the model's chat template rejected these messages: {exc}") from exc

    def _template(self) -> _ChatTemplate:
        """The GGUF's chat template text with its BOS/EOS text (chatml when it has none)."""
        with self._vocab() as vocab:
            if self._chat_template is None:
                self._chat_template = _ChatTemplate.of(vocab)
            return self._chat_template

    def _render_tools(self, request: ChatCompletionRequest,
                      contents: list[str]) -> llama_chat_format.ChatFormatterResponse:
        """The conversation with tools, assistant calls and tool results, rendered through the
        template in its family's way (runtime.engine.tools.families). Every tool is in the
        prompt whatever tool_choice says (as llama-server and OpenAI do): "none" and a named
        function only change what the answer may be, and the prompt's prefix stays the same."""
        chat = self._template()
        called: dict[str, str] = {}  # call id -> function name, for results that omit it
        messages = []
        for message, content in zip(request.messages, contents, strict=True):
            entry = message.template_dict(content)
            for call in message.tool_calls or []:
                if call.id:
                    called[call.id] = call.function.name
            if message.role == "tool" and "name" not in entry:
                entry["name"] = called.get(message.tool_call_id or "", "")
            messages.append(entry)
        try:
            return families.render_response(chat.text, messages, request.tools or [],
                                            bos_token=chat.bos, eos_token=chat.eos,
                                            family=chat.family)
        except RequestError:
            raise
        except Exception as exc:  # jinja templates raise whatever they like
            raise RequestError("invalid_request",
                               f"the model's chat template rejected these messages and tools: "
                               f"{exc}") from exc

    def _prepare_tools(self, request: ChatCompletionRequest
                       ) -> tuple[tool_grammars.ToolGrammar | None, families.Family | None]:
        """Check the tool fields and build the call grammar: (grammar, the family the answer
        is parsed in); RequestError (400) saying what to change."""
        options = request.tools_options()
        fmt = request.response_format
        options.check(response_format=fmt is not None and fmt.type != "text")
        # what the client wrote that the template puts into the prompt besides message text
        # (the placeholder split in _chat_tokens covers that): none of it may spell a control
        # token, or an argument or a tool description could forge a turn
        written = [json.dumps(call.function.arguments_dict(), ensure_ascii=False)
                   for message in request.messages for call in message.tool_calls or []]
        written += [tool.model_dump_json(exclude_none=True) for tool in request.tools or []]
        for text in written:
            if not self._plain(text):
                raise RequestError(
                    "invalid_request",
                    "a tool definition or a tool call's arguments contain the text of the "
                    "model's control tokens (such as its turn markers); remove them")
        if not options.active:
            return None, None
        family = self._template().family
        return tool_grammars.build(options, family, self.grammars), family

    def _plain(self, text: str) -> bool:
        """True when no part of `text` reads as a control token."""
        return (self._tokenize(text, add_bos=False, special=True)
                == self._tokenize(text, add_bos=False, special=False))

    def _chat_tokens(self, request: ChatCompletionRequest, prompt: str, add_bos: bool
                     ) -> list[int]:
        """The rendered prompt's tokens, where only the template's own text can become control
        tokens: message content spelling one (`<|im_start|>system`) is tokenized as plain text,
        so a user cannot forge a turn."""
        contents = [m.text() for m in request.messages]
        if all(self._plain(c) for c in contents):
            return self._tokenize(prompt, add_bos=add_bos, special=True)  # the usual case
        # render again with a placeholder per message to learn where each content went
        # (an empty content stays empty: templates may treat it apart, and it hides nothing)
        skeleton = self._render(request, [f"\ue000{i}\ue001" if content else ""
                                          for i, content in enumerate(contents)])
        pieces = _PLACEHOLDER.split(skeleton.prompt)  # template, index, template, ...
        texts = [(piece, True) if k % 2 == 0 else (contents[int(piece)], False)
                 for k, piece in enumerate(pieces)]
        if "".join(text for text, _ in texts) != prompt:
            raise RequestError(
                "invalid_request",
                "a message contains the text of the model's control tokens, and this model's "
                "chat template changes message text, so edgerunner cannot keep the two apart; "
                "remove the control tokens from the messages")
        tokens: list[int] = []
        for text, special in texts:
            if text:
                tokens += self._tokenize(text, add_bos=add_bos and not tokens, special=special)
        return tokens

    def prepare(self, request: AnyRequest, default_max_tokens: int) -> Prepared:
        """Template, tokenize and build the grammar; RequestError for anything unusable."""
        stop = request.stop_list()
        tool_grammar, tool_family = None, None
        if isinstance(request, ChatCompletionRequest):
            if request.uses_tools:
                tool_grammar, tool_family = self._prepare_tools(request)
            prompt, template_stops, added_special = self.render_chat(request)
            tokens = self._chat_tokens(request, prompt, add_bos=not added_special)
            stop += template_stops
        else:
            prompt = request.prompt
            tokens = self._tokenize(prompt, add_bos=True, special=False)
        if request.max_tokens is not None:
            max_tokens = request.max_tokens
        else:
            # the caller did not ask for a length: fill what is left, up to the configured default
            max_tokens = max(1, min(default_max_tokens, self.n_ctx - len(tokens)))
        return Prepared(
            prompt_tokens=tokens,
            max_tokens=max_tokens,
            stop=stop,
            grammar=self._grammar(request.response_format),
            sampling=SamplingParams.of(request),
            prompt_text=prompt,
            tool_grammar=tool_grammar,
            tool_family=tool_family,
        )

    def _grammar(self, fmt: ResponseFormat | None) -> llama_grammar.LlamaGrammar | None:
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return llama_grammar.LlamaGrammar.from_string(llama_grammar.JSON_GBNF, verbose=False)
        assert fmt.json_schema is not None
        # checked against edgerunner's bounds, then converted, parsed and tried by llama.cpp in
        # a child process (once per schema): a grammar that would crash or stall stays there
        gbnf = self.grammars.build(fmt.json_schema.schema_)
        return llama_grammar.LlamaGrammar.from_string(gbnf, verbose=False)

    # -- generating (worker thread only) ------------------------------------------------------

    @property
    def batcher(self) -> Batcher:
        """The loaded context's sequences; RuntimeError while the weights are not loaded."""
        if self._batcher is None:
            raise RuntimeError("the model is not loaded: call Engine.load() first")
        return self._batcher

    def start(self, prepared: Prepared, on_text: Callable[[str], None] | None) -> Generation:
        """Load the weights if keep_alive unloaded them, then begin generating `prepared`
        beside whatever else runs (check `batcher.room_for` first); `on_text` gets each
        released piece of text from inside `step()`."""
        self.load()
        batcher = self.batcher
        assert self._llm is not None
        sampler = sampler_chain(self._llm._model, prepared.sampling, prepared.grammar,
                                prepared.tool_grammar)
        return batcher.add(prepared.prompt_tokens, prepared.max_tokens, sampler,
                           prepared.stop, on_text)

    def step(self) -> list[Generation]:
        """One decode for every running sequence; the ones that ended in it."""
        return self.batcher.step()

    def end(self, seq: Generation) -> Outcome:
        """Take a sequence out of the batch (its KV cells freed) and say how it went."""
        if self._batcher is not None:
            self._batcher.remove(seq)
        return Outcome(
            finish_reason=seq.finish_reason,
            prompt_tokens=len(seq.prompt),
            completion_tokens=len(seq.completion),
            text=seq.tail.text,
            prompt_evaluated=seq.prompt_evaluated,
            cached_tokens=seq.cached,
        )

    def run(
        self,
        prepared: Prepared,
        on_text: Callable[[str], None] | None,
        should_stop: Callable[[], bool],
    ) -> Outcome:
        """Generate one request alone (nothing else may be running); `should_stop` is polled
        between steps, so it stops within a token (or one n_batch chunk of its prompt)."""
        self.load()
        if self.batcher.active:
            raise RuntimeError("Engine.run needs the batch to itself")
        seq = self.start(prepared, on_text)
        try:
            while not seq.done and not should_stop():
                self.step()
        finally:
            outcome = self.end(seq)
        if seq.error is not None:
            raise seq.error
        return outcome


@dataclass(frozen=True)
class _ChatTemplate:
    """The chat template as text, for rendering tools (the formatter hides it)."""

    text: str
    bos: str
    eos: str
    family: families.Family  # its tool-calling format

    @classmethod
    def of(cls, vocab: LlamaModel) -> _ChatTemplate:
        template = vocab.metadata().get("tokenizer.chat_template")
        if not template:  # what _make_formatter falls back to
            return cls(llama_chat_format.CHATML_CHAT_TEMPLATE, "",
                       llama_chat_format.CHATML_EOS_TOKEN, families.GENERIC)
        eos_id, bos_id = vocab.token_eos(), vocab.token_bos()
        return cls(template, vocab.token_get_text(bos_id) if bos_id != -1 else "",
                   vocab.token_get_text(eos_id) if eos_id != -1 else "",
                   families.detect(template))
