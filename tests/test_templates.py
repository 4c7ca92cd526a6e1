"""Templates section: Go text/template engine, Ollama's Execute modes, truncation, tool and thinking parsers."""
import json
from pathlib import Path

import pytest

import ollama

DATA = Path(__file__).parent / "data" / "templates"

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello, how are you?"},
    {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
    {"role": "user", "content": "I'd like to show off how chat templating works!"},
]

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "unit": {"type": "string", "enum": ["c", "f"], "description": "Unit"},
        "city": {"type": "string", "description": "City <name>"}}}}}


def render(text, data):
    return ollama.render_template(text, data)


# -- library templates ------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(p.stem for p in (DATA / "expected").glob("*.txt")))
def test_library_template_renders_conversation_like_ollama(name):
    text = (DATA / (name + ".gotmpl")).read_text()
    expected = (DATA / "expected" / (name + ".txt")).read_text()
    assert ollama.render_prompt(text, CONVERSATION) == expected


def test_library_template_single_user_message():
    llama3 = (DATA / "llama3-instruct.gotmpl").read_text()
    assert ollama.render_prompt(llama3, [{"role": "user", "content": "Hi"}]) == (
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    gemma = (DATA / "gemma3-instruct.gotmpl").read_text()
    assert ollama.render_prompt(gemma, [{"role": "user", "content": "Hi"}]) == (
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n\n")  # the file ends in a newline


def test_command_r_renders_tools_sorted_and_tool_call_arguments_as_json():
    text = (DATA / "command-r.gotmpl").read_text()
    msgs = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}}]},
            {"role": "tool", "content": "20"}]
    out = ollama.render_prompt(text, msgs, tools=[WEATHER_TOOL])
    assert "def get_weather(city: string, unit: string, ) -> List[Dict]:" in out
    assert "        city (string): City <name>\n        unit (string): Unit\n" in out
    assert '"parameters": {"city":"Paris","unit":"c"}' in out
    assert "<|SYSTEM_TOKEN|><results>\nconsole_output: 20\n</results>" in out
    assert ollama.template_vars(text) >= {"tools", "messages", "toolcalls", "system"}


# -- Ollama's Execute modes -----------------------------------------------------------

MISTRAL_LEGACY = "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}[/INST] "
MISTRAL_MESSAGES = ("[INST] {{ if .System }}{{ .System }}\n\n{{ end }}\n{{- range .Messages }}\n"
                    "{{- if eq .Role \"user\" }}{{ .Content }}[/INST] {{ else if eq .Role \"assistant\" }}"
                    "{{ .Content }}[INST] {{ end }}\n{{- end }}")


@pytest.mark.parametrize("text", [MISTRAL_LEGACY, MISTRAL_LEGACY + "{{ .Response }}", MISTRAL_MESSAGES])
def test_legacy_and_messages_templates_agree(text):
    msgs = [{"role": "system", "content": "You are a helpful assistant!"},
            {"role": "user", "content": "Hello friend!"}, {"role": "assistant", "content": "Hello human!"},
            {"role": "user", "content": "What is your name?"}]
    assert ollama.render_prompt(text, msgs) == (
        "[INST] You are a helpful assistant!\n\nHello friend![/INST] Hello human![INST] What is your name?[/INST] ")


def test_legacy_template_is_cut_at_response_so_generation_continues_a_prefill():
    chatml = ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ if .Prompt }}<|im_start|>user\n"
              "{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n{{ .Response }}<|im_end|>\n")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Name?"}, {"role": "assistant", "content": "My name is"}]
    assert ollama.render_prompt(chatml, msgs) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nName?<|im_end|>\n<|im_start|>assistant\nMy name is")


def test_parse_appends_response_only_without_messages_or_response():
    assert ollama.template_vars("{{ .Prompt }}") == {"prompt", "response"}
    assert ollama.template_vars("{{ .System }} {{ .Prompt }} {{ .Response }}") == {"system", "prompt", "response"}
    assert ollama.template_vars("{{ range .Messages }}{{ .Role }} {{ .Content }}{{ end }}") == {
        "messages", "role", "content"}
    assert ollama.template_vars("{{ json .Messages }}") == {"messages"}
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "yz"}]
    assert ollama.render_prompt("A:", messages) == "A:yz"


def test_default_template_renders_the_prompt():
    assert ollama.render_prompt(None, [{"role": "user", "content": "just this"}]) == "just this"


def test_generate_with_suffix_uses_insert_mode():
    text = "{{- if .Suffix }}<PRE> {{ .Prompt }} <SUF>{{ .Suffix }} <MID>\n{{- else }}{{ .Prompt }}\n{{- end }}"
    assert ollama.render_generate(text, "def add(", suffix="return x") == "<PRE> def add( <SUF>return x <MID>"
    assert ollama.render_generate(text, "hello") == "hello"
    assert ollama.render_generate(MISTRAL_MESSAGES, "Hi", system="Be brief") == "[INST] Be brief\n\nHi[/INST] "


def test_collation_merges_same_role_runs_but_not_tool_messages():
    system, msgs = ollama.collate_messages([
        {"role": "system", "content": "a"}, {"role": "system", "content": "b"},
        {"role": "user", "content": "1"}, {"role": "user", "content": "2"},
        {"role": "tool", "content": "t1"}, {"role": "tool", "content": "t2"}])
    assert system == "a\n\nb"
    assert [(m["role"], m["content"]) for m in msgs] == [
        ("system", "a\n\nb"), ("user", "1\n\n2"), ("tool", "t1"), ("tool", "t2")]
    text = "{{ .System }}|{{ range .Messages }}{{ .Role }}={{ .Content }};{{ end }}"
    assert ollama.render_prompt(text, [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]) == (
        "|user=x\n\ny;")


def test_think_values_reach_the_template():
    text = "{{ .IsThinkSet }} {{ .Think }} {{ .ThinkLevel }}{{ range .Messages }}{{ end }}"
    msgs = [{"role": "user", "content": "q"}]
    assert ollama.render_prompt(text, msgs) == "false false "
    assert ollama.render_prompt(text, msgs, think=True) == "true true medium"
    assert ollama.render_prompt(text, msgs, think="high") == "true true high"
    assert ollama.render_prompt(text, msgs, think=False) == "true false "


def test_tools_print_as_compact_json_in_field_order():
    text = "{{ range .Tools }}{{ . }}{{ end }}|{{ .Tools }}|{{ range .Messages }}{{ range .ToolCalls }}" \
           "{{ .Function.Arguments }}{{ end }}{{ end }}"
    msgs = [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"b": 1, "a": "<&>"}}}]}]
    out = ollama.render_prompt(text, msgs, tools=[WEATHER_TOOL])
    tool_json = ('{"type":"function","function":{"name":"get_weather","description":"Get the weather",'
                 '"parameters":{"type":"object","required":["city"],"properties":{'
                 '"city":{"type":"string","description":"City \\u003cname\\u003e"},'
                 '"unit":{"type":"string","description":"Unit","enum":["c","f"]}}}}}')
    assert out == tool_json + "|[" + tool_json + "]|" + '{"a":"\\u003c\\u0026\\u003e","b":1}'


# -- engine ---------------------------------------------------------------------------

@pytest.mark.parametrize("text,data,expected", [
    ("a  {{- .x -}}  b", {"x": 1}, "a1b"),
    ("a {{- /* comment */ -}} b|{{/* c */}}", {}, "ab|"),
    ("{{- 3 }}{{ -3 }}", {}, "3-3"),
    ("{{ .a.b.c }}", {"a": {"b": {"c": "deep"}}}, "deep"),
    ("{{ .missing }}|{{ .missing.deeper }}|{{ if .missing }}y{{ else }}n{{ end }}", {}, "<no value>|<no value>|n"),
    ("{{ $.x }}{{ with .y }}{{ . }}{{ $.x }}{{ end }}", {"x": "X", "y": "Y"}, "XYX"),
    ("{{ $v := .x }}{{ $v.k }}", {"x": {"k": "K"}}, "K"),
    ("{{ $x := 1 }}{{ if true }}{{ $x = 2 }}{{ $y := 3 }}{{ end }}{{ $x }}", {}, "2"),
    ("{{ range $i, $m := .l }}{{ $i }}{{ $m }},{{ end }}", {"l": ["a", "b"]}, "0a,1b,"),
    ("{{ range .l }}{{ . }}{{ else }}empty{{ end }}", {"l": []}, "empty"),
    ("{{ range $k, $v := .m }}{{ $k }}={{ $v }} {{ end }}", {"m": {"b": 2, "a": 1}}, "a=1 b=2 "),
    ("{{ range .l }}{{ if eq . 2 }}{{ continue }}{{ end }}{{ if eq . 4 }}{{ break }}{{ end }}{{ . }}{{ end }}",
     {"l": [1, 2, 3, 4, 5]}, "13"),
    ("{{ range 3 }}{{ . }}{{ end }}", {}, "012"),
    ("{{ if .a }}A{{ else if .b }}B{{ else }}C{{ end }}", {"b": 1}, "B"),
    ("{{ with .a }}{{ . }}{{ else with .b }}b{{ . }}{{ else }}none{{ end }}", {"b": "!"}, "b!"),
    ("{{ if and .a .b }}y{{ else }}n{{ end }}{{ or .z 0 \"d\" }}{{ and 1 \"\" }}|{{ not 0 }}", {"a": 1, "b": []},
     "nd|true"),
    ("{{ eq .r \"user\" }}{{ eq 1 2 1 }}{{ ne 1 2 }}{{ lt 1 2 }}{{ le 2 2 }}{{ gt \"b\" \"a\" }}{{ ge 1.5 2.5 }}",
     {"r": "user"}, "truetruetruetruetruetruefalse"),
    ("{{ len .s }} {{ len .l }} {{ len .m }}", {"s": "héllo", "l": [1, 2], "m": {}}, "6 2 0"),
    ("{{ slice .l 1 }} {{ slice .l 1 2 }} {{ slice .s 1 3 }} {{ index .l 0 }} {{ index .m \"k\" }}",
     {"l": [1, 2, 3], "s": "abcd", "m": {"k": "v"}}, "[2 3] [2] bc 1 v"),
    ("{{ eq (len (slice $.l 2)) 1 }}", {"l": [1, 2, 3]}, "true"),
    ('{{ printf "%s|%d|%v|%q|%t|%.2f|%5s|%-3d|%x|%%" "s" 42 1.5 "q\\n" true 3.14159 "r" 7 255 }}', {},
     's|42|1.5|"q\\n"|true|3.14|    r|7  |ff|%'),
    ('{{ printf "%d" }}|{{ printf "%d" "x" }}|{{ printf "a" 1 }}', {}, "%!d(MISSING)|%!d(string=x)|a%!(EXTRA int=1)"),
    ('{{ print 1 2 "a" "b" 3 }}|{{ println "a" 1 }}', {}, "1 2ab3|a 1\n"),
    ('{{ "a\\tb\\u00e9\\x41" }}{{ `raw\\n` }}', {}, "a\tbéAraw\\n"),
    ("{{ 1.0 }} {{ 1e6 }} {{ 123456.0 }} {{ 0.00001 }} {{ 0x1F }} {{ true }} {{ 'a' }}", {},
     "1 1e+06 123456 1e-05 31 true 97"),
    ("{{ json .v }}", {"v": {"z": [1, 2.5, None, True], "a": "<b>&\u2028", "m": 1e21, "f": 3.0}},
     '{"a":"\\u003cb\\u003e\\u0026\\u2028","f":3,"m":1e+21,"z":[1,2.5,null,true]}'),
    ("{{ .x | printf \"%s!\" }} {{ \"a\" | printf \"%s%s\" \"b\" }}", {"x": "hi"}, "hi! ba"),
    ("{{ (index .l 1).name }}", {"l": [{}, {"name": "N"}]}, "N"),
    ("{{ .l }} {{ .m }} {{ .n }}", {"l": [1, "a", None], "m": {"b": 1, "a": True}, "n": None},
     "[1 a <nil>] map[a:true b:1] <no value>"),
    ("{{ html \"<a href='x'>&\" }} {{ urlquery \"a b&c\" }}", {}, "&lt;a href=&#39;x&#39;&gt;&amp; a+b%26c"),
])
def test_engine_matches_go_text_template(text, data, expected):
    assert render(text, data) == expected


def test_current_date_functions_print_iso_dates():
    import datetime
    today = datetime.date.today()
    assert render("{{ currentDate }}", {}) == today.isoformat()
    assert render("{{ yesterdayDate }}", {}) == (today - datetime.timedelta(days=1)).isoformat()


def test_to_typescript_type_of_tool_properties():
    text = "{{ range .Tools }}{{ range $k, $v := .Function.Parameters.Properties }}" \
           "{{ $k }}:{{ toTypeScriptType $v }};{{ end }}{{ end }}{{ range .Messages }}{{ end }}"
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"type": ["string", "null"]},
        "c": {"anyOf": [{"type": "array"}, {"type": "object"}]}, "d": {}}}}}
    assert ollama.render_prompt(text, [], tools=[tool]) == \
        "a:number;b:string | null;c:any[] | Record<string, any>;d:any;"


@pytest.mark.parametrize("text,message", [
    ("{{ .x", "unclosed action"),
    ("{{ if .x }}a", "unexpected EOF"),
    ("{{ end }}", "unexpected {{end}}"),
    ("{{ $y }}", 'undefined variable "$y"'),
    ("{{ undefined }}", 'function "undefined" not defined'),
    ("{{ \"abc }}", "unterminated quoted string"),
    ("{{/* x }}", "unclosed comment"),
    ("{{ if }}{{ end }}", "missing value for if"),
    ("{{ range .l }}{{ end }}{{ $i }}", 'undefined variable "$i"'),
    ("{{ define \"x\" }}{{ end }}", "not supported"),
])
def test_parse_errors_are_bad_requests_with_go_messages(text, message):
    with pytest.raises(ollama.TemplateError) as e:
        ollama.parse_template(text)
    assert message in str(e.value)
    assert str(e.value).startswith("template: :1:")
    assert e.value.status == 400


@pytest.mark.parametrize("text,data,message", [
    ("{{ eq 1 \"a\" }}", {}, "incompatible types for comparison"),
    ("{{ index .l 5 }}", {"l": [1]}, "index out of range: 5"),
    ("{{ len 3 }}", {}, "len of type int"),
    ("{{ range .s }}{{ end }}", {"s": "abc"}, "range can't iterate over abc"),
    ("{{ 1 2 }}", {}, "can't give argument to non-function 1"),
])
def test_execution_errors_name_the_action(text, data, message):
    with pytest.raises(ollama.TemplateError) as e:
        render(text, data)
    assert message in str(e.value) and str(e.value).startswith('template: :1: executing "" at <')


def test_message_structs_reject_unknown_fields():
    with pytest.raises(ollama.TemplateError, match="can't evaluate field Nope"):
        ollama.render_prompt("{{ range .Messages }}{{ .Nope }}{{ end }}", [{"role": "user", "content": "x"}])


# -- truncation -----------------------------------------------------------------------

def words(text):
    return len(text.split())


def test_chat_prompt_drops_oldest_messages_but_keeps_system_and_last():
    tmpl = "{{ range .Messages }}{{ .Role }}: {{ .Content }}\n{{ end }}"
    msgs = [{"role": "system", "content": "sys"}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": "w " * 5 + str(i)} for i in range(6)]
    prompt, dropped = ollama.chat_prompt(tmpl, msgs, words, num_ctx=20)
    assert dropped == 4
    assert prompt == "system: sys\nuser: w w w w w 4\nassistant: w w w w w 5\n"
    assert words(prompt) <= 20
    full, none_dropped = ollama.chat_prompt(tmpl, msgs, words, num_ctx=1000)
    assert none_dropped == 0 and full.count("\n") == 7


def test_chat_prompt_keeps_the_last_message_even_if_it_does_not_fit():
    msgs = [{"role": "user", "content": "a"}, {"role": "user2", "content": "b " * 50}]
    prompt, dropped = ollama.chat_prompt("{{ range .Messages }}{{ .Content }}{{ end }}", msgs, words, num_ctx=3)
    assert dropped == 1 and prompt == "b " * 50


def test_chat_prompt_never_orphans_tool_results():
    tmpl = "{{ range .Messages }}{{ .Role }} {{ .Content }}|{{ end }}"
    msgs = [{"role": "user", "content": "long " * 10},
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
            {"role": "tool", "content": "r1"}, {"role": "tool", "content": "r2"}]
    prompt, dropped = ollama.chat_prompt(tmpl, msgs, words, num_ctx=4)
    assert (prompt, dropped) == ("assistant |tool r1|tool r2|", 1)


def test_chat_prompt_without_truncate_refuses_a_prompt_over_the_context():
    msgs = [{"role": "user", "content": "one two three four"}]
    with pytest.raises(ollama.BadRequest) as e:
        ollama.chat_prompt("{{ .Prompt }}", msgs, words, num_ctx=3, truncate=False)
    assert "4 tokens" in str(e.value) and "3 tokens" in str(e.value) and e.value.status == 400
    assert ollama.chat_prompt("{{ .Prompt }}", msgs, words, num_ctx=4, truncate=False) == ("one two three four", 0)


def test_chat_prompt_counts_image_tokens():
    msgs = [{"role": "user", "content": "old"}, {"role": "user2", "content": "new", "images": ["aGk="]}]
    prompt, dropped = ollama.chat_prompt("{{ range .Messages }}{{ .Content }} {{ end }}", msgs, words, num_ctx=9,
                                         image_tokens=8)
    assert (prompt, dropped) == ("new ", 1)


# -- tool calls -----------------------------------------------------------------------

QWEN_TOOLS = ("{{ range .Messages }}{{ if .ToolCalls }}<tool_call>\n{{ range .ToolCalls }}"
              "{\"name\": \"{{ .Function.Name }}\"}{{ end }}</tool_call>{{ end }}{{ end }}")


@pytest.mark.parametrize("text,tag", [
    (QWEN_TOOLS, "<tool_call>"),
    ("{{ range .Messages }}{{ if .ToolCalls }}[TOOL_CALLS] [{{ range .ToolCalls }}{}{{ end }}]{{ end }}{{ end }}",
     "[TOOL_CALLS] ["),                 # the whole first text node: only "{" cuts it
    ("{{ range .Messages }}{{ if .ToolCalls }}{{ range .ToolCalls }}{\"name\": 1}{{ end }}{{ end }}{{ end }}", "{"),
    ("{{ range .Messages }}{{ if eq .Role \"x\" }}{{ else if .ToolCalls }}\n  functools[{{ end }}{{ end }}",
     "functools["),
    ("{{ .Prompt }}", "{"),
])
def test_tool_tag_is_inferred_from_the_template(text, tag):
    assert ollama.infer_tool_tag(text) == tag


TOOLS = [WEATHER_TOOL, {"type": "function", "function": {"name": "get_time", "parameters": {}}}]


def run_parser(tag, chunks):
    p = ollama.ToolCallParser(TOOLS, tag)
    content, calls = "", []
    for chunk in chunks:
        c, found = p.feed(chunk)
        content += c
        calls += found
    return content + p.done(), calls


def call_summary(calls):
    return [(c["function"]["index"], c["function"]["name"], c["function"]["arguments"]) for c in calls]


CASES = [
    ("<tool_call>", 'Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris \\"x\\" {}"}}</tool_call>',
     "Sure. ", [(0, "get_weather", {"city": 'Paris "x" {}'})]),
    ("{", '{"name": "get_weather", "parameters": "{\\"city\\": \\"Rome\\"}"}',
     "", [(0, "get_weather", {"city": "Rome"})]),
    ("[", '[{"name": "get_weather", "arguments": {"city": "A"}}, {"name": "get_time", "arguments": {}}]',
     "", [(0, "get_weather", {"city": "A"}), (1, "get_time", {})]),
    ("{", '{"tool_calls": [{"get_weather": {"city": "B"}}]}', "", [(0, "get_weather", {"city": "B"})]),
    ("{", "The weather is nice {really}", "The weather is nice {really}", []),
    ("{", '{"not": "a call"}', '{"not": "a call"}', []),
    ("<tool_call>", '<tool_call>{"name": "get_weather", "arguments": {"city": ', '<tool_call>{"name": "get_weather", '
     '"arguments": {"city": ', []),
    ("[TOOL_CALLS]", 'x [TOOL_C', 'x [TOOL_C', []),
]


@pytest.mark.parametrize("tag,output,content,calls", CASES)
def test_tool_parser_finds_calls_at_every_chunk_split(tag, output, content, calls):
    whole = run_parser(tag, [output])
    assert whole[0] == content and call_summary(whole[1]) == calls
    for i in range(len(output) + 1):
        got_content, got_calls = run_parser(tag, [output[:i], output[i:]])
        assert got_content == content, i
        assert call_summary(got_calls) == calls, i
    one_char = run_parser(tag, list(output))
    assert one_char[0] == content and call_summary(one_char[1]) == calls


def test_tool_call_ids_are_call_and_eight_lowercase_alphanumerics():
    _, calls = run_parser("{", ['{"name": "get_time", "arguments": {}}'])
    assert len(calls) == 1 and calls[0]["id"].startswith("call_")
    suffix = calls[0]["id"][5:]
    assert len(suffix) == 8 and all(c in "abcdefghijklmnopqrstuvwxyz0123456789" for c in suffix)
    assert json.dumps(calls[0]["function"]) == '{"index": 0, "name": "get_time", "arguments": {}}'


# -- thinking ---------------------------------------------------------------------------

def test_thinking_tags_are_inferred_from_the_template():
    text = ("{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ if .Thinking }}<think>{{ .Thinking }}</think>{{ end }}"
            "{{ .Content }}<|im_end|>{{ end }}")
    assert ollama.infer_thinking_tags(text) == ("<think>", "</think>")
    assert ollama.infer_thinking_tags("{{ .Thinking }}{{ range .Messages }}{{ end }}") == ("", "")
    assert ollama.infer_thinking_tags((DATA / "chatml.gotmpl").read_text()) == ("", "")


def run_thinking(chunks):
    p = ollama.ThinkingParser("<think>", "</think>")
    thinking, content = "", ""
    for c in chunks:
        t, c2 = p.feed(c)
        thinking += t
        content += c2
    t, c2 = p.done()
    return thinking + t, content + c2


@pytest.mark.parametrize("output,thinking,content", [
    ("  <think>\n  I reason.\n</think>\n\n  Answer.", "I reason.\n", "Answer."),
    ("No thinking here <think>x</think>", "", "No thinking here <think>x</think>"),
    ("<think>only thoughts", "only thoughts", ""),
    ("<think></think>Answer", "", "Answer"),
])
def test_thinking_parser_splits_at_every_chunk_boundary(output, thinking, content):
    assert run_thinking([output]) == (thinking, content)
    for i in range(len(output) + 1):
        assert run_thinking([output[:i], output[i:]]) == (thinking, content), i
    assert run_thinking(list(output)) == (thinking, content)
