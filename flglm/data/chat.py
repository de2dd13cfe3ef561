"""Prompts through the tokenizer's chat template (``task.chat_template``).

A chat-tuned checkpoint expects its prompts wrapped in its template (role markers, an opening
for the assistant's turn). The prompt becomes the user's message and the template is rendered
with ``add_generation_prompt``, so what the model scores or continues is its own answer. A
prompt template's ``{text}`` survives rendering (Jinja leaves the message content alone), so
the collators still cut only the example's text to fit ``data.max_length``.
"""

from __future__ import annotations

from typing import Any


class ChatTemplateError(ValueError):
    """``task.chat_template`` is set but the tokenizer has no chat template."""


def check_chat_template(tokenizer: Any, where: str) -> None:
    """Raise :class:`ChatTemplateError` naming ``where`` the tokenizer came from if it has no template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"task.chat_template=true but the tokenizer from {where} has no chat template "
            "(chat_template in tokenizer_config.json or chat_template.jinja); set task.chat_template=false"
        )


def chat_prompt(tokenizer: Any, prompt: str) -> str:
    """``prompt`` as the user's turn of the tokenizer's chat template, ready for the answer.

    A leading BOS token the template writes is dropped: the collators and the generation loop
    put the tokenizer's BOS in front of every row themselves, and two would differ from training.
    """
    check_chat_template(tokenizer, "this run")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and tokenizer.bos_token_id is not None and text.startswith(bos):
        text = text[len(bos) :]
    return text
