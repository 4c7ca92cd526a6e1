"""OpenAI Responses (/v1/responses) with the official `openai` client: plain and streamed, a function
tool round trip, json_schema output, reasoning, errors; plus the input mapping onto /api/chat."""
import json

import pytest

import ollama
from test_anthropic import THINK, TINY, agent_server
from test_embed import CHAT, TOOLS
from test_openai import PERSON, TOOL_CALL_FORMAT

openai = pytest.importorskip("openai")

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL_FORMAT = {"format": {"type": "json_schema", "name": "call", "schema": TOOL_CALL_FORMAT}}


@pytest.fixture(scope="module")
def api(tmp_path_factory, llama_server_bin, gemma_gguf, tiny_gguf):
    with agent_server(tmp_path_factory.mktemp("responses"), llama_server_bin, gemma_gguf, tiny_gguf) as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(api):
    return openai.OpenAI(base_url=api.url + "/v1", api_key="ollama", max_retries=0, timeout=120)


def test_responses_create(oai):
    r = oai.responses.create(model=CHAT, input="Say hi", instructions="You are terse.", max_output_tokens=8,
                             temperature=0, top_p=0.9)
    assert r.object == "response" and r.id.startswith("resp_") and r.status == "completed" and r.model == CHAT
    assert r.instructions == "You are terse." and r.previous_response_id is None and r.store is False
    assert r.output[0].type == "message" and r.output[0].content[0].type == "output_text" and r.output_text
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 8
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_responses_stream_events(oai):
    events = list(oai.responses.create(model=TINY, input=[{"role": "user", "content": "x"}], max_output_tokens=4,
                                       stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = events[-1].response
    assert done.status == "completed" and done.output_text == text and done.usage.output_tokens == 4


def test_responses_stream_helper(oai):
    with oai.responses.stream(model=CHAT, input="Count: 1, 2,", max_output_tokens=6, temperature=0) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text and final.output_text == text


def test_function_tool_round_trip(oai):
    ask = {"role": "user", "content": "What is the weather in Paris?"}
    first = oai.responses.create(model=TOOLS, input=[ask], tools=[WEATHER], text=CALL_FORMAT, temperature=0,
                                 max_output_tokens=40)
    call = [o for o in first.output if o.type == "function_call"][0]
    assert call.name == "get_weather" and "city" in json.loads(call.arguments) and call.call_id
    second = oai.responses.create(
        model=TOOLS, tools=[WEATHER], tool_choice="none", temperature=0, max_output_tokens=16,
        input=[ask, {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": "18C and sunny"}])
    assert second.output[0].type == "message" and "sunny" in second.output_text.lower()


def test_streamed_function_call_arguments(oai):
    events = list(oai.responses.create(model=TOOLS, input="Weather in Oslo?", tools=[WEATHER], text=CALL_FORMAT,
                                       temperature=0, max_output_tokens=40, stream=True))
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) == 1 and "city" in json.loads(deltas[0].delta)
    assert events[-1].type == "response.completed"
    assert [o.type for o in events[-1].response.output] == ["function_call"]


def test_json_schema_output(oai):
    r = oai.responses.create(model=CHAT, input="Describe a person as JSON.", temperature=0, max_output_tokens=60,
                             text={"format": {"type": "json_schema", "name": "person", "schema": PERSON}})
    person = json.loads(r.output_text)
    assert set(person) == {"name", "age"} and isinstance(person["age"], int)
    assert r.text.format.type == "json_schema"


def test_reasoning_becomes_a_reasoning_item(oai):
    r = oai.responses.create(model=THINK, input="Think.", reasoning={"effort": "low"}, max_output_tokens=6)
    assert r.output[0].type == "reasoning" and r.output[0].summary[0].text
    events = list(oai.responses.create(model=THINK, input="Think.", reasoning={"effort": "low"},
                                       max_output_tokens=6, stream=True))
    assert "response.reasoning_summary_text.delta" in {e.type for e in events}
    assert events[-1].response.output[0].type == "reasoning"


def test_previous_response_id_is_ignored_as_in_ollama(oai):
    r = oai.responses.create(model=TINY, input="x", previous_response_id="resp_earlier", max_output_tokens=2)
    assert r.status == "completed" and r.previous_response_id is None


def test_errors_are_openai_shaped(oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.responses.create(model="nope", input="x")
    assert e.value.body["message"] == "model 'nope' not found" and e.value.body["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError, match="invalid reasoning value"):
        oai.responses.create(model=TINY, input="x", reasoning={"effort": "loud"})
    with pytest.raises(openai.BadRequestError, match="file inputs are not currently supported"):
        oai.responses.create(model=TINY, input=[{"role": "user", "content": [
            {"type": "input_file", "file_data": "aGk=", "filename": "a.txt"}]}])


# -- the mapping onto /api/chat (no engine) ----------------------------------------

def test_input_items_map_onto_messages():
    chat = ollama._responses_chat({
        "model": "m", "instructions": "Be brief.", "max_output_tokens": 7, "top_p": 0.5, "tools": [WEATHER],
        "reasoning": {"effort": "minimal"}, "stream": True,
        "text": {"format": {"type": "json_schema", "name": "p", "schema": PERSON}},
        "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
                  {"type": "reasoning", "summary": [{"type": "summary_text", "text": "hmm"}]},
                  {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city":"Oslo"}'},
                  {"type": "function_call_output", "call_id": "c1", "output": "-3C"},
                  {"role": "assistant", "content": [{"type": "output_text", "text": "Cold."}]}]})
    assert chat == {
        "model": "m", "stream": True, "think": "low", "format": PERSON,
        "options": {"temperature": 1.0, "top_p": 0.5, "num_predict": 7},
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                                    "parameters": WEATHER["parameters"]}}],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "", "thinking": "hmm",
             "tool_calls": [{"id": "c1", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
            {"role": "tool", "content": "-3C", "tool_call_id": "c1", "tool_name": "get_weather"},
            {"role": "assistant", "content": "Cold."}]}


def test_namespaces_expand_and_web_search_is_left_out():
    tools = ollama._from_responses_tools([{"type": "namespace", "name": "fs", "tools": [
        {"type": "function", "name": "read", "parameters": {"type": "object"}}]}, {"type": "web_search"}])
    assert [t["function"]["name"] for t in tools] == ["fs.read"]


@pytest.mark.parametrize("value,message", [
    ([{"content": "x"}], "input[0]: input item missing required 'type' field"),
    ([{"type": "nope"}], 'input[0]: unknown input item type: "nope"'),
    ([{"type": "function_call", "name": "f", "arguments": "{oops"}], "failed to parse function call arguments"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "input[0]: content[0]: unknown content type: audio"),
    (5, "input must be a string or array"),
])
def test_bad_input_is_400(value, message):
    with pytest.raises(ollama.BadRequest) as e:
        ollama._responses_chat({"model": "m", "input": value})
    assert str(e.value).startswith(message)
