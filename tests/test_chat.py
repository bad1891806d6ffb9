"""Chat templates: each family's SCoRe episode renders as its documented format, encodes to ids
that decode back to that text with every turn marker one id, and matches transformers'
apply_chat_template on the official jinja templates (written below from each family's
tokenizer_config.json, without the tool and image branches)."""

import io

import pytest
import sentencepiece as spm
import transformers

import test_tokenizer
from score_jax import chat
from score_jax import prompts
from score_jax import tokenizer

PROBLEM, CORRECTION = "What is 2+2?", "Check your answer and correct it."

# The two-turn episode (problem, "4", correction, "5") as each family documents its format,
# ending with the model's end-of-turn token (a finished conversation in the official
# templates also writes template.after_model_end after it).
EXPECTED = {
    "gemma": (
        "<bos><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n"
        "<start_of_turn>user\nCheck your answer and correct it.<end_of_turn>\n<start_of_turn>model\n5<end_of_turn>"
    ),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nCheck your answer and correct it.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n5<|eot_id|>"
    ),
    "llama3.1": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nCheck your answer and correct it.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n5<|eot_id|>"
    ),
    "chatml": (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nCheck your answer and correct it.<|im_end|>\n<|im_start|>assistant\n5<|im_end|>"
    ),
    "qwen3": (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nCheck your answer and correct it.<|im_end|>\n<|im_start|>assistant\n5<|im_end|>"
    ),
}

# The official chat templates (jinja, as in each checkpoint's tokenizer_config.json), without
# their tool-calling and image branches.
JINJA = {
    # Gemma 3 (Gemma 2's differs only in rejecting system messages).
    "gemma": r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
""",
    # Llama 3 (3.0) Instruct.
    "llama3": r"""{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>

'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>

' }}{% endif %}""",
    # Llama 3.1 Instruct.
    "llama3.1": r"""{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
""",
    # Qwen2.5 Instruct.
    "chatml": r"""{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
""",
    # Qwen3.
    "qwen3": r"""{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if '</think>' in message.content %}
            {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
            {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
""",
}

FAMILY = {"gemma": "gemma", "llama3": "llama3", "llama3.1": "llama3", "chatml": "qwen", "qwen3": "qwen"}
NAMES = sorted(FAMILY)
# Each family's end-of-turn id, then its end-of-text id (the ids generation_config.json stops at).
STOP_IDS = {"gemma": (106, 1), "llama3": (128009, 128001), "llama3.1": (128009, 128001),
            "chatml": (151645, 151643), "qwen3": (151645, 151643)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Template name -> (our tokenizer, transformers' tokenizer) over one checkpoint directory."""
    root = tmp_path_factory.mktemp("chat")
    out = {}
    for name in NAMES:
        directory = test_tokenizer.write_checkpoint(root / name, FAMILY[name], chat_template=JINJA[name])
        # The fast tokenizer class reads tokenizer.json and tokenizer_config.json as they are
        # (AutoTokenizer would also read config.json, which imports torch: seconds).
        out[name] = tokenizer.load(directory), transformers.PreTrainedTokenizerFast.from_pretrained(str(directory))
    return out


def _episode_ids(tok, template, problem, attempts, correction):
    ids = chat.encode_prompt(tok, template, problem)
    for t, attempt in enumerate(attempts):
        if t:
            ids += chat.instruction_ids(tok, template, correction)
        ids += chat.response_ids(tok, template, attempt)
    return ids


def _messages(problem, attempts, correction):
    messages = [{"role": "user", "content": problem}]
    for t, attempt in enumerate(attempts):
        if t:
            messages.append({"role": "user", "content": correction})
        messages.append({"role": "assistant", "content": attempt})
    return messages


@pytest.mark.parametrize("name", NAMES)
def test_episode_renders_the_documented_format(name):
    template = chat.get(name)
    assert chat.render_episode(template, PROBLEM, ["4", "5"], CORRECTION) == EXPECTED[name]
    x1 = template.bos_text + template.first_prompt(PROBLEM)
    y1 = template.response("4")
    assert EXPECTED[name] == x1 + y1 + template.between_turns(CORRECTION) + template.response("5")
    assert chat.render_episode(template, PROBLEM, [], CORRECTION) == x1


@pytest.mark.parametrize("name", NAMES)
def test_episode_ids_decode_to_the_rendering(checkpoints, name):
    tok, _ = checkpoints[name]
    template = chat.get(name)
    for attempts in (["4", "5"], ["4", "5", " 6\n"], ["The answer is $4$.\n\nFinal Answer: 4"]):
        ids = _episode_ids(tok, template, PROBLEM, attempts, CORRECTION)
        text = chat.render_episode(template, PROBLEM, attempts, CORRECTION)
        assert tok.decode(ids) == text
        # With the decoding equal, as many ids as occurrences means every marker is one id.
        for piece in {*template.special_pieces, *template.stop_pieces, template.bos_text} - {""}:
            assert ids.count(tok.token_id(piece)) == text.count(piece), piece
    if template.bos:
        assert chat.encode_prompt(tok, template, PROBLEM)[0] == tok.bos_id == tok.token_id(template.bos_text)


@pytest.mark.parametrize("name", NAMES)
def test_stop_ids_are_the_end_of_turn_ids(checkpoints, name):
    tok, _ = checkpoints[name]
    template = chat.get(name)
    assert chat.stop_ids(tok, template) == STOP_IDS[name]
    assert chat.response_ids(tok, template, "4")[-1] == STOP_IDS[name][0]
    assert set(chat.stop_ids(tok, template)) <= set(tok.eos_ids)


@pytest.mark.parametrize("name", NAMES)
def test_matches_transformers_apply_chat_template(checkpoints, name):
    tok, hf = checkpoints[name]
    template = chat.get(name)
    cases = [(PROBLEM, ["4", "5", "6"]),
             # Whitespace around messages: Gemma and Llama trim it, Qwen keeps it.
             ("  What is 2+2?\n", [" 4\n", "5\n\n"])]
    for problem, attempts in cases:
        for k in range(len(attempts) + 1):
            # The prompt the model sees before attempt k+1 (the sampler's prefix)...
            ours = chat.render_episode(template, problem, attempts[:k], CORRECTION)
            ours += template.between_turns(CORRECTION) if k else ""
            messages = _messages(problem, attempts[:k], CORRECTION) + ([{"role": "user", "content": CORRECTION}] if k else [])
            theirs = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            assert ours == theirs
            # ... and its ids are the tokenizer's ids of that whole text, except where an answer
            # starts with whitespace: at the prompt/answer boundary the sampler joins ids, and
            # one string would merge across it.
            ids = _episode_ids(tok, template, problem, attempts[:k], CORRECTION)
            ids += chat.instruction_ids(tok, template, CORRECTION) if k else []
            if not any(template.response(a)[:1].isspace() for a in attempts[:k]):
                assert ids == hf.encode(theirs, add_special_tokens=False)
        assert chat.instruction_ids(tok, template, CORRECTION) == hf.encode(
            template.between_turns(CORRECTION), add_special_tokens=False)
        if name != "qwen3":  # Qwen3 writes an empty think block into a finished conversation's last answer
            finished = hf.apply_chat_template(_messages(problem, attempts, CORRECTION), tokenize=False)
            assert chat.render_episode(template, problem, attempts, CORRECTION) + template.after_model_end == finished


def test_gemma_over_sentencepiece(tmp_path):
    """Gemma checkpoints also ship tokenizer.model, which `load` prefers: markers are still single ids."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(  # Gemma's settings: no normalisation, byte fallback, its ids
        sentence_iterator=iter(test_tokenizer.BPE_TEXT), model_writer=model, vocab_size=400, hard_vocab_limit=False,
        model_type="bpe", normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>", "\n"], minloglevel=2, num_threads=1)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    tok = tokenizer.load(tmp_path)
    template = chat.get("gemma")
    sot, eot = tok.token_id("<start_of_turn>"), tok.token_id("<end_of_turn>")
    assert chat.encode_prompt(tok, template, PROBLEM) == [
        2, sot, *tok.encode("user\n" + PROBLEM), eot, *tok.encode("\n"), sot, *tok.encode("model\n")]
    assert chat.stop_ids(tok, template) == (eot, 1)
    ids = _episode_ids(tok, template, PROBLEM, ["4", "5"], CORRECTION)
    # sentencepiece decodes the control piece <bos> to "".
    assert tok.decode(ids) == EXPECTED["gemma"].removeprefix("<bos>")


def test_toy_template_ids_are_unchanged(tmp_path):
    path = tmp_path / "tokenizer.model"
    tokenizer.train_sentencepiece(["What is 1 + 2?", "Answer: 3", prompts.TOY_CORRECTION] * 20, path,
                                  vocab_size=120, user_symbols=chat.TOY.special_pieces)
    tok = tokenizer.load(path)
    toy = chat.get("toy")
    user, model, eot = (tok.token_id(p) for p in ("<user>", "<model>", "<eot>"))
    assert toy.first_prompt("What is 1 + 2?") == "<user>What is 1 + 2?<eot><model>"
    assert chat.encode_prompt(tok, toy, "What is 1 + 2?") == [tok.bos_id, user, *tok.encode("What is 1 + 2?"), eot, model]
    assert chat.instruction_ids(tok, toy, prompts.TOY_CORRECTION) == [user, *tok.encode(prompts.TOY_CORRECTION), eot, model]
    assert chat.response_ids(tok, toy, "Answer: 3") == [*tok.encode("Answer: 3"), eot]
    assert chat.stop_ids(tok, toy) == (eot,)


def test_default_for_model_types():
    expected = {"gemma2": "gemma", "gemma3": "gemma", "gemma3_text": "gemma", "llama": "llama3",
                "qwen2": "chatml", "qwen3": "qwen3"}
    assert {m: chat.default_for(m) for m in expected} == expected
    assert all(chat.get(chat.default_for(m)).name == chat.default_for(m) for m in chat.MODEL_TYPES)
    with pytest.raises(ValueError, match="No chat template is known for model_type 'mistral'"):
        chat.default_for("mistral")


def test_errors_name_the_missing_piece(checkpoints):
    llama, _ = checkpoints["llama3"]
    with pytest.raises(KeyError, match="'chatml' ends model turns with '<\\|im_end\\|>', which is not one token"):
        chat.stop_ids(llama, chat.get("chatml"))
    with pytest.raises(KeyError, match="'gemma' needs '<start_of_turn>' as one token"):
        chat.encode_prompt(llama, chat.get("gemma"), PROBLEM)
    with pytest.raises(ValueError, match="Unknown chat template 'llama2'"):
        chat.get("llama2")
    with pytest.raises(ValueError, match="model_end '<eot>' must be one of stop_pieces"):
        chat.ChatTemplate(name="bad", user_start="<u>", user_end="<eot>", model_start="<m>", model_end="<eot>")
