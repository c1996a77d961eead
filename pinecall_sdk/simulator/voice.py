"""Voice calls in the simulator: a call played out in events, at speech pace.

A :class:`CallPlayer` runs one :class:`~.state.Call`: the caller follows its script
(:func:`~.state.parse_script`), the canned AI answers (``ai.compose_voice_reply``), and
the supervisor commands of ``pinecall-voice-protocol.md`` act on it. It sends every
frame on the connection of the agent that holds the number, the WhatsApp one, live
only (``Simulator._deliver_live``: never buffered nor replayed after a resume).

Order of events (a caller's line, then the AI's answer)::

    call.ringing (numbers added with ringing:true; answer call.accept / call.reject)
    call.started
    speech.started, user.speaking x n (the draft grows word by word), speech.ended,
    user.message (final), turn.end
    [llm.tool_call]  bot.speaking, bot.word x n, message.confirmed, bot.finished
    ... caller talks over: speech.started, barge_in, bot.interrupted (reason user_spoke)
    session.idle_warning, session.timeout (after a long silence)
    call.ended

Our choices (the protocol document is silent on them):

* Every frame carries ``agent_id``, ``call_id``, then its fields, then ``session_id``
  (= ``call_id``), ``seq`` (per call, from 1) and ``ts`` (epoch seconds), as captured.
* ``user.speaking`` has ``text``, ``confidence``, ``turn_id`` and, from the second
  draft on, ``confirmed_text`` (the words before the last one); no ``message_id``, as
  in the capture: the final ``user.message`` carries the id (``um_…``).
* Pace: ``voice_pace`` seconds per word (the caller's drafts and the bot's words);
  the AI thinks ``2 x pace`` after ``turn.end``, the caller answers ``3 x pace`` after
  the bot finished. ``bot.word`` times (``start_time`` / ``end_time``) and
  ``duration_ms`` / ``played_ms`` are audio times, 0.3 s per word, whatever the pace.
* The AI answers only when the agent's config has an ``llm`` (without one the server
  runs no LLM: the client answers with ``bot.reply``); its lines have ``text: ""`` in
  ``bot.speaking`` (a streamed server-LLM reply); a ``bot.reply`` has its whole text.
  A ``greeting`` in the agent's config (a string or a per-language map) is said first.
* The bot says one line at a time: a ``bot.reply`` that comes while it speaks waits
  for the current line to end. Every line gets ``message.confirmed`` then
  ``bot.finished``; it enters the history (``role: assistant``) at confirmation, for a
  ``bot.reply`` only with ``add_to_history: true``. A line cut off enters it with the
  words spoken. A ``bot.reply`` with ``in_reply_to`` naming anything but the last
  ``user.message`` is ``reply.rejected`` (reason ``message_obsolete``).
* ``bot.cancel``: the line being said (or the line ``message_id``) ends with
  ``bot.interrupted`` reason ``cancelled``; a line still waiting its turn gets
  ``message.aborted`` (reason ``cancelled``). Nothing being said: no answer at all.
* ``call.hold``: the caller waits, silent, until ``call.unhold`` (the idle timer too).
  ``call.mute``: the caller goes on with the script, but nothing of it is sent and the
  AI does not answer; the words come back in ``call.unmuted.muted_transcript`` (None if
  nothing was said).
* ``call.forward``: ``call.forwarded {to}``, then ``call.ended`` reason ``forwarded``.
  ``call.hangup``: ``call.ended`` reason ``client_hangup``; the caller hanging up (a
  ``hangup`` step, :meth:`Simulator.end_call`) is reason ``hangup``. A rejected ringing
  call: ``call.rejected {reason}``, then ``call.ended`` with that reason (and
  ``direction``/``from``/``to``, as for any call that never connected).
* Silence: ``session.idle_warning`` when the caller has said nothing (and the bot has
  not spoken) for ``call_idle_timeout - remaining`` seconds (``remaining`` =
  min(10, timeout / 2)), then ``session.timeout`` reason ``idle_timeout`` and
  ``call.ended`` reason ``idle_timeout``; ``call_max_duration`` likewise ends it
  (``max_duration``).
* When the agent's connection goes away, its calls end at once (reason
  ``agent_disconnected``) and no ``call.ended`` is sent or kept for later: the
  JavaScript SDK ends those calls itself, and so does ours.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import ai
from .state import Call, Step, epoch, new_message_id, utcnow

if TYPE_CHECKING:
    from .server import Simulator

log = logging.getLogger("pinecall_sdk.simulator")

WORD_SECONDS = 0.3  # audio time of one word (bot.word times, played_ms, duration_ms)
_tool_ids = itertools.count(1)


@dataclass(eq=False)
class Speech:
    """One line of the bot, from its turn in the queue to its end."""

    message_id: str
    text: str
    source: str  # "ai", "supervisor", "greeting"
    add_to_history: bool = True
    state: str = "queued"  # queued, speaking, finished, interrupted, aborted
    spoken: int = 0
    words: list[str] = field(init=False)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.words = self.text.split()

    @property
    def over(self) -> bool:
        return self.state in ("finished", "interrupted", "aborted")


class CallPlayer:
    """Plays one call: the caller's script, the AI, the supervisor's commands."""

    def __init__(self, sim: "Simulator", call: Call) -> None:
        self.sim = sim
        self.call = call
        self.lines: list[Speech] = []  # queued and speaking, in order
        self.last_reply: Speech | None = None  # the AI's answer to the caller's last line
        self._lock = asyncio.Lock()  # one line at a time
        self._changed = asyncio.Event()  # any change in what the bot says
        self._unheld = asyncio.Event()
        self._unheld.set()
        self._answered = asyncio.Event()  # ringing: accepted or rejected
        self._activity = asyncio.Event()  # the caller spoke or the bot said a word
        self._ended = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._max_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ frames

    @property
    def pace(self) -> float:
        return max(0.0, self.sim.voice_pace)

    def send(self, event: str, **fields: Any) -> None:
        call = self.call
        call.seq += 1
        frame: dict[str, Any] = {"event": event, "agent_id": call.agent_id, "call_id": call.id}
        frame.update(fields)
        frame.update({"session_id": call.id, "seq": call.seq, "ts": epoch(utcnow())})
        self.sim._deliver_live(call.agent_id, frame)

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"sim-call-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def tasks(self) -> list[asyncio.Task[Any]]:
        """The call's running tasks (the caller, the bot's lines, the idle watch)."""
        return list(self._tasks)

    def _touch(self) -> None:
        self._activity.set()
        self._changed.set()

    # ------------------------------------------------------------------ the call

    def start(self) -> None:
        self.spawn(self._run(), self.call.id)

    async def _run(self) -> None:
        call = self.call
        try:
            if call.ringing:
                self.send("call.ringing", **{"from": call.from_, "to": call.to, "direction": call.direction})
                try:
                    async with asyncio.timeout(self.sim.ring_timeout):
                        await self._answered.wait()
                except TimeoutError:
                    log.info("call %s: not answered in %s s, accepted anyway", call.id, self.sim.ring_timeout)
                if call.ended:
                    return
            self.connect()
            greeting = self._greeting()
            if greeting:
                speech = self.say(greeting, source="greeting")
                await speech.done.wait()
            for step in call.script:
                await self._unheld.wait()
                if step.hangup:
                    await self._wait_silent()
                    self.end("hangup")
                    return
                if step.silence:
                    await asyncio.sleep(step.silence)
                    continue
                await self.caller_line(step)
            await self._ended.wait()  # the caller stays on the line
        except asyncio.CancelledError:
            raise
        except Exception:  # the simulator must not die with one call
            log.exception("call %s failed", call.id)
            self.end("failed")

    def connect(self) -> None:
        """``call.started``; the idle watch and the maximum duration start."""
        call = self.call
        if call.state != "ringing":
            return
        call.state = "live"
        call.started_at = utcnow()
        self._answered.set()
        self.send("call.started", **{
            "from": call.from_, "to": call.to, "direction": call.direction,
            "metadata": call.metadata, "language": call.language, "transport": "phone",
        })
        self.spawn(self._idle_watch(), f"{call.id}-idle")
        self._max_timer = asyncio.get_running_loop().call_later(
            self.sim.call_max_duration, self._max_duration
        )

    def reject(self, reason: str) -> None:
        """A ringing call refused by the client: ``call.rejected``, then ``call.ended``."""
        self.send("call.rejected", reason=reason)
        self.end(reason)

    def end(self, reason: str, *, notify: bool = True) -> None:
        """End the call now (every task of it stops); ``notify``: send ``call.ended``."""
        call = self.call
        if call.ended:
            return
        call.state = "ended"
        call.ended_at = utcnow()
        call.end_reason = reason
        self._ended.set()
        self._answered.set()
        if self._max_timer is not None:
            self._max_timer.cancel()
        for speech in self.lines:
            speech.state = "aborted" if speech.state == "queued" else "interrupted"
            speech.done.set()
        self.lines.clear()
        self._changed.set()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        log.info("call %s ended (%s)", call.id, reason)
        if notify:
            self.send("call.ended", **call.ended_fields())

    def _max_duration(self) -> None:
        if not self.call.ended:
            self.send("session.timeout", reason="max_duration")
            self.end("max_duration")

    def _greeting(self) -> str | None:
        agent = self.sim.agent(self.call.agent_id)
        greeting = agent.config.get("greeting") if agent is not None else None
        if isinstance(greeting, dict):
            greeting = greeting.get(self.call.language) or next(iter(greeting.values()), None)
        return greeting if isinstance(greeting, str) and greeting.strip() else None

    def _ai_on(self) -> bool:
        agent = self.sim.agent(self.call.agent_id)
        return agent is not None and bool(agent.config.get("llm"))

    # ------------------------------------------------------------------ the caller

    async def caller_line(self, step: Step) -> None:
        call, pace = self.call, self.pace
        reply = self.last_reply
        if step.barge_in is not None and reply is not None and not reply.over:
            await self._wait_words(reply, step.barge_in)  # then talk over it
        else:
            await self._wait_silent()
            await asyncio.sleep(3 * pace)
        await self._unheld.wait()
        assert step.say is not None
        text = " ".join(step.say.split())
        words = text.split()
        if call.muted:  # transcribed, but nobody hears it
            await asyncio.sleep(len(words) * pace)
            if call.muted:
                call.muted_transcript.append(text)
                self._activity.set()
                return
        call.turns += 1
        turn = call.turns
        self.send("speech.started", turn_id=turn, confidence=0.92, timestamp=epoch(utcnow()))
        self._activity.set()
        speaking = next((s for s in self.lines if s.state == "speaking"), None)
        if speaking is not None:  # the caller talks over the bot
            self._interrupt(speaking, "user_spoke")
        for count in range(1, len(words) + 1):
            await asyncio.sleep(pace)
            draft: dict[str, Any] = {"text": " ".join(words[:count]),
                                     "confidence": round(min(0.6 + 0.05 * count, 0.9), 2), "turn_id": turn}
            if count > 1:
                draft["confirmed_text"] = " ".join(words[: count - 1])
            self.send("user.speaking", **draft)
            self._activity.set()
        await asyncio.sleep(pace)
        self.send("speech.ended", turn_id=turn, duration_ms=len(words) * 300, timestamp=epoch(utcnow()))
        message_id = new_message_id("um")
        call.last_user_message_id = message_id
        call.history.append({"role": "user", "content": text, "source": "caller"})
        self.send("user.message", message_id=message_id, text=text, confidence=0.95, turn_id=turn,
                  language=call.language, lag_ms=180, phone_number=call.from_)
        self.send("turn.end", turn_id=turn, probability=0.97, latency_ms=240, text=text,
                  message_id=message_id)
        self._activity.set()
        if self._ai_on():
            await self._ai_answer(text)

    async def _ai_answer(self, text: str) -> None:
        await asyncio.sleep(2 * self.pace)
        if self.call.ended or self.call.muted:
            return
        reply, tool = ai.compose_voice_reply(self.call, text)
        message_id = new_message_id("msg")
        if tool is not None:
            self.send("llm.tool_call", msg_id=message_id, tool_calls=[
                {"id": f"call_{next(_tool_ids)}", "name": tool["name"], "arguments": tool["arguments"]},
            ])
            await asyncio.sleep(self.pace)
        self.last_reply = self.say(reply, source="ai", message_id=message_id)

    async def _wait_silent(self) -> None:
        """Until the bot has nothing left to say."""
        while self.lines:
            self._changed.clear()
            await self._changed.wait()

    async def _wait_words(self, speech: Speech, count: int) -> None:
        """Until ``speech`` said ``count`` words (or is over)."""
        while not speech.over and (speech.state != "speaking" or speech.spoken < count):
            self._changed.clear()
            await self._changed.wait()

    async def _idle_watch(self) -> None:
        timeout = self.sim.call_idle_timeout
        remaining = min(10.0, timeout / 2)
        while not self.call.ended:
            if not await self._quiet_for(timeout - remaining):
                continue
            self.send("session.idle_warning", remaining_seconds=remaining, idle_timeout_seconds=timeout)
            if not await self._quiet_for(remaining):
                continue
            self.send("session.timeout", reason="idle_timeout")
            self.end("idle_timeout")
            return

    async def _quiet_for(self, seconds: float) -> bool:
        """True when nothing happened for ``seconds`` (time on hold does not count)."""
        self._activity.clear()
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            async with asyncio.timeout(seconds):
                await self._activity.wait()
            return False
        except TimeoutError:
            if not self._unheld.is_set():
                await self._unheld.wait()
                return False
            return not self.lines

    # ------------------------------------------------------------------ the bot

    def say(
        self, text: str, *, source: str, message_id: str | None = None, add_to_history: bool = True
    ) -> Speech:
        """Queue a line of the bot; it is said when the lines before it are over."""
        speech = Speech(message_id or new_message_id("msg"), text, source, add_to_history)
        self.lines.append(speech)
        self._changed.set()
        self.spawn(self._speak(speech), f"{self.call.id}-{speech.message_id}")
        return speech

    async def _speak(self, speech: Speech) -> None:
        try:
            async with self._lock:
                if speech.state != "queued" or self.call.ended:
                    return
                speech.state = "speaking"
                self._touch()
                self.send("bot.speaking", message_id=speech.message_id,
                          text=speech.text if speech.source == "supervisor" else "")
                for index, word in enumerate(speech.words):
                    await asyncio.sleep(self.pace)
                    if speech.state != "speaking":
                        return  # cut off meanwhile (bot.interrupted already sent)
                    start = round(index * WORD_SECONDS, 3)
                    self.send("bot.word", message_id=speech.message_id, word=word, word_index=index,
                              start_time=start, end_time=round(start + WORD_SECONDS - 0.05, 3))
                    speech.spoken = index + 1
                    self._touch()
                await asyncio.sleep(self.pace)
                if speech.state != "speaking":
                    return
                speech.state = "finished"
                self.send("message.confirmed", message_id=speech.message_id, text=speech.text)
                if speech.add_to_history:
                    self.call.history.append({"role": "assistant", "content": speech.text,
                                              "source": speech.source})
                self.send("bot.finished", message_id=speech.message_id,
                          duration_ms=len(speech.words) * int(WORD_SECONDS * 1000))
        finally:
            self._retire(speech)

    def _retire(self, speech: Speech) -> None:
        if speech in self.lines:
            self.lines.remove(speech)
        speech.done.set()
        self._changed.set()

    def _interrupt(self, speech: Speech, reason: str) -> None:
        """Cut a line off: a line being said gets ``bot.interrupted`` (after ``barge_in``
        when the caller talked over it), a waiting one ``message.aborted``."""
        if speech.state == "speaking":
            if reason == "user_spoke":
                self.send("barge_in", cancelled_message_id=speech.message_id)
            spoken = speech.words[: speech.spoken]
            self.send("bot.interrupted", message_id=speech.message_id,
                      played_ms=speech.spoken * int(WORD_SECONDS * 1000), words_spoken=speech.spoken,
                      last_word=spoken[-1] if spoken else "", reason=reason)
            speech.state = "interrupted"
            if spoken and speech.add_to_history:
                self.call.history.append({"role": "assistant", "content": " ".join(spoken),
                                          "source": speech.source})
        elif speech.state == "queued":
            self.send("message.aborted", message_id=speech.message_id, reason=reason)
            speech.state = "aborted"
        self._retire(speech)

    # ------------------------------------------------------------------ supervisor commands

    def reply(self, message_id: str, text: str, in_reply_to: str, add_to_history: bool) -> None:
        """``bot.reply``."""
        call = self.call
        if in_reply_to and in_reply_to != call.last_user_message_id:
            self.send("reply.rejected", message_id=message_id, in_reply_to=in_reply_to,
                      expected_reply_to=call.last_user_message_id or "", reason="message_obsolete")
            return
        self.say(text, source="supervisor", message_id=message_id, add_to_history=add_to_history)

    def cancel(self, message_id: str | None) -> None:
        """``bot.cancel``: the line being said, or the line ``message_id``."""
        if message_id is None:
            target = next((s for s in self.lines if s.state == "speaking"), None)
        else:
            target = next((s for s in self.lines if s.message_id == message_id), None)
        if target is not None:
            self._interrupt(target, "cancelled")

    def hold(self, held: bool) -> None:
        self.call.held = held
        if held:
            self._unheld.clear()
            self.send("call.held")
        else:
            self._unheld.set()
            self._activity.set()
            self.send("call.unheld")

    def mute(self, muted: bool) -> None:
        call = self.call
        call.muted = muted
        if muted:
            self.send("call.muted")
        else:
            said = " ".join(call.muted_transcript) or None
            call.muted_transcript.clear()
            self.send("call.unmuted", muted_transcript=said)

    def forward(self, to: str) -> None:
        self.call.forwarded_to = to
        self.send("call.forwarded", to=to)
        self.end("forwarded")

    def answer(self, accept: bool, reason: str = "busy") -> None:
        """``call.accept`` / ``call.reject`` of a ringing call."""
        if accept:
            self.connect()
        else:
            self.reject(reason)
