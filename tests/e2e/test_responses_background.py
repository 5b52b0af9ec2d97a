"""Background responses outlive the API process that drives them: another process takes the response over,
and a client that replays its stream (``starting_after``) gets every event once, in order, to the end."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.fleet import Fleet

pytestmark = pytest.mark.e2e
MODEL = "smollm2-135m"


def _sdk(fleet: Fleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fleet.base_url}/v1", api_key="x", max_retries=0, timeout=120)


def test_a_background_response_survives_its_api_process(fleet: Fleet) -> None:
    with _sdk(fleet) as sdk:
        stream = sdk.responses.create(
            model=MODEL,
            input="Write a long story about a dragon.",
            background=True,
            stream=True,
            max_output_tokens=80,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        before: list[dict[str, Any]] = []
        for event in stream:
            before.append(event.model_dump(mode="json"))
            if len(before) == 8:  # created, queued, in_progress, item and part added, 3 deltas
                break
        stream.close()
    response_id = before[0]["response"]["id"]
    assert [e["type"] for e in before[:3]] == ["response.created", "response.queued", "response.in_progress"]
    fleet.kill_api()
    fleet.start_api()
    with _sdk(fleet) as sdk:
        after = [
            e.model_dump(mode="json")
            for e in sdk.responses.retrieve(
                response_id, stream=True, starting_after=before[-1]["sequence_number"]
            )
        ]
        stored = sdk.responses.retrieve(response_id)
    events = before + after
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert after[-1]["type"] == "response.incomplete"  # ignore_eos: it runs into max_output_tokens
    final = after[-1]["response"]
    text = final["output"][0]["content"][0]["text"]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == text
    assert final["usage"]["output_tokens"] == 80
    assert stored.status == "incomplete" and stored.output_text == text


def test_a_cancelled_background_response_stays_cancelled(fleet: Fleet) -> None:
    with _sdk(fleet) as sdk:
        queued = sdk.responses.create(
            model=MODEL, input="Count to a thousand.", background=True, max_output_tokens=400
        )
        assert queued.status == "queued" and queued.background
        cancelled = sdk.responses.cancel(queued.id)
        assert cancelled.status == "cancelled"
        # The replay ends (nothing more is logged for a cancelled response) and the status holds.
        replayed = [e.type for e in sdk.responses.retrieve(queued.id, stream=True, starting_after=-1)]
        assert replayed[:2] == ["response.created", "response.queued"]
        assert "response.completed" not in replayed
        assert sdk.responses.retrieve(queued.id).status == "cancelled"
        with pytest.raises(openai.BadRequestError):
            sdk.responses.cancel(sdk.responses.create(model=MODEL, input="hi", max_output_tokens=2).id)
