"""A prompt's prefix as a chain of block hashes: what affinity routing matches without rendering the prompt.

The API never loads a tokenizer or a chat template, so it cannot name the tokens an engine caches. It hashes
the job's text instead, as the engine would see it before templating: the messages (role and content, in
order) or the raw prompt, cut into blocks of ``BLOCK_CHARS`` characters. Each block's hash covers every block
before it, so a block hash names a whole prefix: the next turn of a conversation, whose text starts with the
previous turn's text, shares the previous turn's block hashes, and a worker that holds block *k* of a chain
holds the prefix of *k* blocks. Only whole blocks count (a partial last block changes as the history grows).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from queueing.jobs import ChatMessage, Job

BLOCK_CHARS = 256
# About 4 characters a token in English text with these models' BPE vocabularies: what turns matched
# characters into the prompt tokens a match saves.
CHARS_PER_TOKEN = 4
# A chain is cut here (256 Ki characters, ~64k tokens): longer prompts match on their first blocks only.
MAX_BLOCKS = 1024
# Separators no chat text contains, so that two different conversations never serialise alike.
_ROLE_END, _MESSAGE_END = "\x1f", "\x1e"


def messages_text(messages: Sequence[ChatMessage]) -> str:
    return "".join(f"{m.role}{_ROLE_END}{m.content}{_MESSAGE_END}" for m in messages)


def job_text(job: Job, reply: str | None = None) -> str:
    """The text a job's prompt is made of; with ``reply``, also what the engine holds after generating it
    (the next turn of a chat sends the reply back as the assistant's message)."""
    if job.kind == "completion":
        return (job.prompt or "") + (reply or "")
    messages = list(job.messages)
    if reply is not None:
        messages.append(ChatMessage(role="assistant", content=reply))
    return messages_text(messages)


def block_hashes(text: str) -> list[str]:
    """The chained hashes of ``text``'s whole blocks, first block first."""
    hashes: list[str] = []
    previous = b""
    for start in range(0, min(len(text), BLOCK_CHARS * MAX_BLOCKS) - BLOCK_CHARS + 1, BLOCK_CHARS):
        block = text[start : start + BLOCK_CHARS].encode("utf-8", "surrogatepass")
        previous = hashlib.blake2b(previous + block, digest_size=8).digest()
        hashes.append(previous.hex())
    return hashes


def estimated_tokens(text: str) -> int:
    return len(text) // CHARS_PER_TOKEN


def tokens_per_block() -> int:
    return BLOCK_CHARS // CHARS_PER_TOKEN
