"""The question after the call (gateway/core/survey.py): answered in the widget after a browser
call (with the ticket's status token), or by text after a phone call (the number asked
proves who answers). Each answer is stored on its call and added to its agent's and its
branch's tallies, which supervisors read (``GET /v1/sites/{site}/survey-scores``).

A phone call's question is texted once the callback completes, when the texting rules allow
(gateway/services/customer_texts.py: the site texts, the number has not said STOP, not in
its quiet hours, within the callback's texts); the number's next texted score answers it
within two days. Promoters (9 and 10) are offered the site's referral link, in the widget
or in the reply.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

from gateway.core import callback as cb
from gateway.core import survey
from gateway.core.call import Call, CallChannel, CallError
from gateway.core.model import sites_by_caller_id
from gateway.core.survey import Group, Tally
from gateway.i18n import messages_for
from gateway.ops.tasks import TaskGroup
from gateway.services.call_records import CallRecords
from gateway.services.customer_texts import CustomerTexts
from gateway.services.sms_presence import MESSAGE_CLAIM_TTL_S, InboundSms, e164

log = logging.getLogger(__name__)

ASKED_TTL_S = 2 * 86_400.0
"""How long a texted question waits for its answer."""


@dataclass(frozen=True, slots=True)
class SurveyAnswer:
    call: Call
    referral_url: str | None
    """The site's referral link, for a promoter."""


@dataclass(frozen=True, slots=True)
class Scores:
    """A site's tallies: each agent's and each branch's, by id."""

    agents: Mapping[str, Tally]
    branches: Mapping[str, Tally]


class Surveys:
    def __init__(self, records: CallRecords, texts: CustomerTexts, tasks: TaskGroup) -> None:
        self._records = records
        self._store = records.store
        self._texts = texts
        self._tasks = tasks
        self.on_answer: Callable[[str, str], None] | None = None
        """Told of each answer's site and group (the Prometheus figures)."""
        self._sites_by_number = sites_by_caller_id(records.sites)

    async def answer(self, call: Call, score: int, comment: str) -> SurveyAnswer:
        """Store the answer to ``call``'s question (once) and add it to the tallies."""
        now = self._records.clock()
        change = partial(survey.answered, score=score, comment=comment, now=now)
        _, answered = await self._records.update(call.call_id, change, call)
        site = self._records.sites[call.site]
        group = survey.group_of(score)
        agent = site.agents.get(answered.agent_id or "")
        subjects = [f"agent:{answered.agent_id}"]
        if agent is not None and agent.branch is not None:
            subjects.append(f"branch:{agent.branch}")
        await self._store.add_to_tally(call.site, subjects, group.value)
        if self.on_answer is not None:
            self.on_answer(call.site, group.value)
        await self._records.notify.call_update(answered)
        referral = site.referral_url if group is Group.PROMOTER and site.referral_url else None
        return SurveyAnswer(answered, referral)

    async def scores(self, site_id: str) -> Scores:
        agents: dict[str, Tally] = {}
        branches: dict[str, Tally] = {}
        for subject, counts in (await self._store.tallies(site_id)).items():
            kind, _, name = subject.partition(":")
            (agents if kind == "agent" else branches)[name] = Tally.of(counts)
        return Scores(agents, branches)

    async def agent_nps(self, site_id: str) -> dict[str, float]:
        """Each agent's NPS, of those with answers (the best_nps routing policy's)."""
        agents = (await self.scores(site_id)).agents
        return {a: t.nps for a, t in agents.items() if t.nps is not None}

    # --- by text, after a phone call -------------------------------------------------------

    def changed(self, before: Call | None, after: Call) -> None:
        """A ``CallRecords`` observer: a callback's customer talked to an agent and the call
        ended (on whichever path: a phone hung up, the app): text them the question."""
        if after.channel is not CallChannel.CALLBACK or not survey.just_talked(before, after):
            return
        if self._records.sites[after.site].survey and after.phone is not None:
            self._tasks.spawn(self._ask(after), f"survey:{after.call_id}")

    async def _ask(self, call: Call) -> None:
        now = self._records.clock()
        if not await self._texts.may_text(call, notice=True, now=now):
            return
        phone = call.phone
        assert phone is not None
        call = await self._records.move(call, partial(cb.texted, now=now))
        await self._store.set_survey_asked(call.site, phone, call.call_id, now, ASKED_TTL_S)
        text = messages_for(call.request.language)
        body = text.gettext(
            "{site}: thanks for talking to us. How likely are you to recommend us to a friend?"
            " Reply with a number from 0 (not likely) to 10 (very likely), and a comment if you"
            " like. Reply STOP to opt out."
        ).format(site=self._records.sites[call.site].name)
        await self._texts.send(call, body)

    async def answer_by_text(self, message: InboundSms) -> tuple[bool, str | None]:
        """Whether ``message`` answers a texted question, and the reply to send."""
        parsed = survey.parse_text_answer(message.body)
        sender = e164(message.from_)
        if parsed is None or sender is None:
            return False, None
        now = self._records.clock()
        for site in self._sites_by_number.get(e164(message.to) or "", []):
            call_id = await self._store.survey_asked(site.site_id, sender, now)
            if call_id is not None:
                break
        else:
            return False, None
        if not await self._store.claim_message_once(
            message.account_sid, message.message_sid, MESSAGE_CLAIM_TTL_S
        ):
            return True, None  # a replay: answered once
        call = await self._records.get(call_id)
        text = messages_for(call.request.language)
        score, comment = parsed
        try:
            answer = await self.answer(call, score, comment)
        except CallError as e:
            log.info("texted answer for %s refused: %s", call_id, e.code)
            return True, text.gettext("{site}: you have answered already. Thank you!").format(
                site=site.name
            )
        await self._store.clear_survey_asked(site.site_id, sender, call_id)
        if answer.referral_url:
            return True, text.gettext(
                "{site}: thank you! If you'd like to tell a friend about us: {link}"
            ).format(site=site.name, link=answer.referral_url)
        return True, text.gettext("{site}: thank you for your answer!").format(site=site.name)
