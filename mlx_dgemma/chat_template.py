"""A Gemma 4-style chat template with tools, for the models built here (tiny test
models, the demo).

Gemma 4's (and so DiffusionGemma's) template renders, with special tokens:

- a system turn ``<|turn>system\\n...<turn|>\\n`` holding ``<|think|>`` (thinking on),
  the system message and one ``<|tool>declaration:NAME{...}<tool|>`` per tool;
- user and model turns ``<|turn>user\\n...<turn|>\\n`` / ``<|turn>model\\n...``;
- a model's calls ``<|tool_call>call:NAME{key:<|"|>text<|"|>,n:3}<tool_call|>``, after
  which the model writes ``<|tool_response>`` (a stop token: the tool runs) and the
  client's results come back in the SAME model turn as
  ``<|tool_response>response:NAME{value:<|"|>result<|"|>}<tool_response|>``; the model
  then goes on with its answer in that turn;
- with thinking off, an empty thought channel ``<|channel>thought\\n<channel|>`` after
  a new model turn's header.

This is a faithful subset of Google's template (same output for text, function tools
with object/string/number/boolean/array/enum parameters, assistant ``tool_calls`` and
``tool`` role results resolved by ``tool_call_id``, ``reasoning_content`` kept only
between a call and its result, image parts as ``\n\n<|image|>\n\n`` with the text
parts around them trimmed), written for this project; audio, video and Google's
``tool_responses`` message field are left out. ``mlx_lm.tokenizer_utils`` recognises the
``<|tool_call>``/``<tool_call|>`` pair and attaches mlx-lm's Gemma 4 tool parser.
"""

from __future__ import annotations

# Gemma 4's control tokens that the template and the tool format use. Tokenizers built
# here make each one a single special token, as Gemma 4's tokenizer does.
TURN_OPEN, TURN_CLOSE = "<|turn>", "<turn|>"
CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"
THINK = "<|think|>"
TOOL_OPEN, TOOL_CLOSE = "<|tool>", "<tool|>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<|tool_call>", "<tool_call|>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<|tool_response>", "<tool_response|>"
STRING_DELIMITER = '<|"|>'
# Images: the template writes IMAGE_TOKEN (between blank lines) where a message's content
# has an image part; mlx_dgemma.images expands it to BOI + one IMAGE_TOKEN per soft token
# + EOI, as Gemma 4's processor does.
BOI_TOKEN, IMAGE_TOKEN, EOI_TOKEN = "<|image>", "<|image|>", "<image|>"
IMAGE_TOKENS = [BOI_TOKEN, IMAGE_TOKEN, EOI_TOKEN]

CONTROL_TOKENS = [TURN_OPEN, TURN_CLOSE, CHANNEL_OPEN, CHANNEL_CLOSE, THINK, TOOL_OPEN, TOOL_CLOSE,
                  TOOL_CALL_OPEN, TOOL_CALL_CLOSE, TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE, STRING_DELIMITER]

# Values: strings in <|"|>, booleans lower case, mappings {k:v} with sorted keys (keys in
# <|"|> when escape_keys), lists [a,b], anything else as Jinja prints it.
_FORMAT_ARGUMENT = """
{%- macro format_argument(argument, escape_keys=True) -%}
{%- if argument is string -%}{{- '<|"|>' + argument + '<|"|>' -}}
{%- elif argument is boolean -%}{{- 'true' if argument else 'false' -}}
{%- elif argument is mapping -%}{{- '{' -}}
{%- for key, value in argument | dictsort -%}
{%- if not loop.first %},{% endif -%}
{%- if escape_keys %}{{- '<|"|>' + key + '<|"|>' -}}{% else %}{{- key -}}{% endif -%}
:{{- format_argument(value, escape_keys=escape_keys) -}}
{%- endfor -%}{{- '}' -}}
{%- elif argument is sequence -%}{{- '[' -}}
{%- for item in argument -%}{%- if not loop.first %},{% endif -%}{{- format_argument(item, escape_keys=escape_keys) -}}{%- endfor -%}
{{- ']' -}}
{%- else -%}{{- argument -}}
{%- endif -%}
{%- endmacro -%}
"""

# One parameter schema per property (sorted by name): description, enum (strings),
# items (arrays), nullable, nested properties/required (objects), then the upper-cased type.
_FORMAT_PARAMETERS = """
{%- macro type_name(value) -%}
{{- (value['type'] if value['type'] is string else (value['type'] or [''])[0]) | upper -}}
{%- endmacro -%}
{%- macro format_required(names) -%}
required:[{%- for name in names -%}{%- if not loop.first %},{% endif -%}{{- '<|"|>' + name + '<|"|>' -}}{%- endfor -%}]
{%- endmacro -%}
{%- macro format_parameters(properties) -%}
{%- set standard_keys = ['description', 'type', 'properties', 'required', 'nullable'] -%}
{%- set ns = namespace(first=true) -%}
{%- for key, value in properties | dictsort -%}
{%- if key not in standard_keys -%}
{%- if not ns.first %},{% endif -%}{%- set ns.first = false -%}
{%- set kind = type_name(value) -%}
{%- set parts = [] -%}
{%- if value['description'] -%}{%- set parts = parts + ['description:<|"|>' + value['description'] + '<|"|>'] -%}{%- endif -%}
{%- if kind == 'STRING' and value['enum'] -%}{%- set parts = parts + ['enum:' + format_argument(value['enum'])] -%}{%- endif -%}
{%- if kind == 'ARRAY' and value['items'] is mapping and value['items'] -%}
{%- set item = value['items'] -%}
{%- set inner = [] -%}
{%- if item['properties'] is mapping -%}{%- set inner = inner + ['properties:{' + format_parameters(item['properties']) + '}'] -%}{%- endif -%}
{%- if item['required'] -%}{%- set inner = inner + [format_required(item['required'])] -%}{%- endif -%}
{%- if item['type'] -%}{%- set inner = inner + ['type:' + format_argument(type_name(item))] -%}{%- endif -%}
{%- set parts = parts + ['items:{' + inner | join(',') + '}'] -%}
{%- endif -%}
{%- if value['nullable'] -%}{%- set parts = parts + ['nullable:true'] -%}{%- endif -%}
{%- if kind == 'OBJECT' and value['properties'] is mapping -%}
{%- set parts = parts + ['properties:{' + format_parameters(value['properties']) + '}'] -%}
{%- if value['required'] -%}{%- set parts = parts + [format_required(value['required'])] -%}{%- endif -%}
{%- endif -%}
{%- set parts = parts + ['type:<|"|>' + kind + '<|"|>'] -%}
{{- key -}}:{ {{- parts | join(',') -}} }
{%- endif -%}
{%- endfor -%}
{%- endmacro -%}
{%- macro format_function_declaration(tool) -%}
{%- set function = tool['function'] -%}
declaration:{{- function['name'] -}}{description:<|"|>{{- function['description'] or '' -}}<|"|>
{%- set params = function['parameters'] -%}
{%- if params -%}
,parameters:{
{%- if params['properties'] -%}properties:{ {{- format_parameters(params['properties']) -}} },{%- endif -%}
{%- if params['required'] -%}{{- format_required(params['required']) -}},{%- endif -%}
type:<|"|>{{- (params['type'] or 'object') | upper -}}<|"|>}
{%- endif -%}
}
{%- endmacro -%}
"""

_FORMAT_CALLS_AND_RESULTS = """
{%- macro format_tool_response(name, response) -%}
{{- '<|tool_response>response:' + name + '{' -}}
{%- if response is mapping -%}
{%- for key, value in response | dictsort -%}{%- if not loop.first %},{% endif -%}{{- key -}}:{{- format_argument(value, escape_keys=False) -}}{%- endfor -%}
{%- else -%}value:{{- format_argument(response, escape_keys=False) -}}
{%- endif -%}
{{- '}<tool_response|>' -}}
{%- endmacro -%}
{%- macro has_images(content) -%}
{%- if content is not string and content is sequence -%}{%- for part in content if part['type'] in ['image', 'image_url', 'input_image'] -%}1{%- endfor -%}{%- endif -%}
{%- endmacro -%}
{%- macro text_of(content) -%}
{%- if content is string -%}{{- content -}}
{%- elif content is sequence and has_images(content) -%}
{%- for part in content -%}
{%- if part['type'] == 'text' -%}{{- part['text'] | trim -}}
{%- elif part['type'] in ['image', 'image_url', 'input_image'] -%}{{- '\n\n<|image|>\n\n' -}}
{%- endif -%}
{%- endfor -%}
{%- elif content is sequence -%}{%- for part in content if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- macro strip_thinking(text) -%}
{%- set ns = namespace(out='') -%}
{%- for part in text.split('<channel|>') -%}
{%- set ns.out = ns.out + (part.split('<|channel>')[0] if '<|channel>' in part else part) -%}
{%- endfor -%}
{{- ns.out | trim -}}
{%- endmacro -%}
"""

_BODY = """
{%- set thinking = enable_thinking is defined and enable_thinking -%}
{%- set ns = namespace(prev=None, last_user=-1) -%}
{%- set loop_messages = messages -%}
{{- bos_token -}}
{%- if thinking or tools or messages[0]['role'] in ['system', 'developer'] -%}
{{- '<|turn>system\\n' -}}
{%- if thinking -%}{{- '<|think|>\\n' -}}{%- endif -%}
{%- if messages[0]['role'] in ['system', 'developer'] -%}
{{- text_of(messages[0]['content']) | trim -}}
{%- set loop_messages = messages[1:] -%}
{%- endif -%}
{%- for tool in tools or [] -%}{{- '<|tool>' + format_function_declaration(tool) | trim + '<tool|>' -}}{%- endfor -%}
{{- '<turn|>\\n' -}}
{%- endif -%}
{%- for message in loop_messages -%}{%- if message['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for message in loop_messages -%}
{%- if message['role'] != 'tool' -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{%- set previous = namespace(role=None) -%}
{%- for j in range(loop.index0) -%}{%- if loop_messages[j]['role'] != 'tool' -%}{%- set previous.role = loop_messages[j]['role'] -%}{%- endif -%}{%- endfor -%}
{%- if not (role == 'model' and previous.role == 'assistant') -%}{{- '<|turn>' + role + '\\n' -}}{%- endif -%}
{%- set ns.prev = None -%}
{%- set calls = message['tool_calls'] or [] -%}
{%- set thought = message['reasoning_content'] or message['reasoning'] -%}
{%- if thought and calls and loop.index0 > ns.last_user -%}{{- '<|channel>thought\\n' + thought + '\\n<channel|>' -}}{%- endif -%}
{%- for call in calls -%}
{%- set function = call['function'] -%}
{{- '<|tool_call>call:' + function['name'] + '{' -}}
{%- if function['arguments'] is mapping -%}
{%- for key, value in function['arguments'] | dictsort -%}{%- if not loop.first %},{% endif -%}{{- key -}}:{{- format_argument(value, escape_keys=False) -}}{%- endfor -%}
{%- elif function['arguments'] is string -%}{{- function['arguments'] -}}
{%- endif -%}
{{- '}<tool_call|>' -}}
{%- set ns.prev = 'tool_call' -%}
{%- endfor -%}
{%- set answered = namespace(flag=false, stop=false) -%}
{%- if calls -%}
{%- for k in range(loop.index0 + 1, loop_messages | length) -%}
{%- if loop_messages[k]['role'] != 'tool' -%}{%- set answered.stop = true -%}{%- endif -%}
{%- if not answered.stop -%}
{%- set result = loop_messages[k] -%}
{%- set name = namespace(value=result['name'] or 'unknown') -%}
{%- for call in calls -%}{%- if call['id'] and call['id'] == result['tool_call_id'] -%}{%- set name.value = call['function']['name'] -%}{%- endif -%}{%- endfor -%}
{{- format_tool_response(name.value, result['content'] if result['content'] is mapping else text_of(result['content'])) -}}
{%- set answered.flag = true -%}
{%- set ns.prev = 'tool_response' -%}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- set content = text_of(message['content']) -%}
{{- strip_thinking(content) if role == 'model' else (content if has_images(message['content']) else content | trim) -}}
{%- if ns.prev == 'tool_call' -%}{{- '<|tool_response>' -}}
{%- elif not (answered.flag and not content) -%}{{- '<turn|>\\n' -}}
{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and ns.prev not in ['tool_call', 'tool_response'] -%}
{{- '<|turn>model\\n' -}}
{%- if not thinking -%}{{- '<|channel>thought\\n<channel|>' -}}{%- endif -%}
{%- endif -%}
"""

GEMMA4_CHAT_TEMPLATE = "".join(s.strip() for s in (_FORMAT_ARGUMENT, _FORMAT_PARAMETERS, _FORMAT_CALLS_AND_RESULTS, _BODY))
