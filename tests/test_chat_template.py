"""Chat templates: a GGUF made here with a known template renders exactly as transformers'
`apply_chat_template` renders the same messages; the fallback; template errors."""

from __future__ import annotations

import gguf
import pytest

from engine.chat import ChatTemplateError, chat_prompt, render_template
from engine.errors import BadRequest
from engine.gguf_info import read_metadata

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")

GEMMA = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{% if role == 'system' %}{% continue %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": "Hola, ¿cómo estás?"}],
    [{"role": "system", "content": "Sos Ramón, un maestro jubilado."},
     {"role": "user", "content": "¿Cómo se siente hoy?"},
     {"role": "assistant", "content": "Vine porque mi hija insistió."},
     {"role": "user", "content": "¿Qué le preocupa a su hija?"}],
]


def gguf_with_template(tmp_path, template: str):
    """A metadata-only GGUF file carrying `template`, as the converter writes it."""
    path = tmp_path / "template.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_chat_template(template)
    writer.add_bos_token_id(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def hf_tokenizer(template: str):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({"<s>": 0, "</s>": 1, "[UNK]": 2}, unk_token="[UNK]"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", chat_template=template)


@pytest.mark.parametrize("template", [CHATML, LLAMA2, GEMMA], ids=["chatml", "llama2", "gemma"])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_gguf_template_renders_like_transformers(tmp_path, template, conversation):
    messages = CONVERSATIONS[conversation]
    stored = read_metadata(gguf_with_template(tmp_path, template))["tokenizer.chat_template"]
    assert stored == template
    ours = render_template(stored, messages, bos_token="<s>", eos_token="</s>")
    theirs = hf_tokenizer(template).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours == theirs


def test_bos_written_by_the_template_is_left_to_the_tokenizer():
    messages = CONVERSATIONS[0]
    assert chat_prompt(GEMMA, messages, bos_token="<bos>", tokenizer_adds_bos=True).text.startswith("<start_of_turn>")
    assert chat_prompt(GEMMA, messages, bos_token="<bos>", tokenizer_adds_bos=False).text.startswith("<bos>")


def test_fallback_without_template():
    prompt = chat_prompt(None, CONVERSATIONS[1])
    assert prompt.text == ("Sos Ramón, un maestro jubilado.\n\nUser: ¿Cómo se siente hoy?\n"
                           "Assistant: Vine porque mi hija insistió.\nUser: ¿Qué le preocupa a su hija?\nAssistant:")
    assert prompt.extra_stops == ("\nUser:",) and not prompt.templated


def test_template_refusing_the_conversation_is_a_400_with_its_reason():
    with pytest.raises(BadRequest) as err:
        render_template(LLAMA2, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert "alternate" in err.value.message


def test_broken_template_is_a_500_with_the_reason():
    with pytest.raises(ChatTemplateError) as err:
        render_template("{% for m in messages %}{{ m.content ", CONVERSATIONS[0])
    assert err.value.status == 500 and "compile" in err.value.message


def test_sandbox_blocks_unsafe_templates():
    with pytest.raises((ChatTemplateError, BadRequest)):
        render_template("{{ messages.__class__.__mro__[1].__subclasses__() }}", CONVERSATIONS[0])
