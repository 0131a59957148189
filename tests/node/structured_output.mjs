// Structured output through the official JavaScript clients (#20): ollama-js with `format: "json"`
// and a JSON schema, openai-node with response_format json_object and json_schema (strict), and a
// schema the grammar cannot enforce refused with a 400 that names the field.
// Usage: AI_ENGINE_URL=... MODEL=... node structured_output.mjs SCHEMA_FILE
// Prints one JSON object; tests/test_structured_output.py parses and validates its replies.
import { readFile } from 'node:fs/promises';
import { Ollama } from 'ollama';
import OpenAI from 'openai';

const url = process.env.AI_ENGINE_URL;
const model = process.env.MODEL;
const schema = JSON.parse(await readFile(process.argv[2], 'utf8'));
const prompt = 'Evalúa la entrevista del estudiante como JSON.';

const ollama = new Ollama({ host: url });
const asJson = await ollama.generate({ model, prompt, format: 'json', options: { num_predict: 300 } });
const withSchema = await ollama.chat({
  model, format: schema, options: { num_predict: 300, temperature: 0.7 },
  messages: [{ role: 'user', content: prompt }],
});
let streamed = '';
for await (const part of await ollama.chat({
  model, format: schema, stream: true, options: { num_predict: 300 }, messages: [{ role: 'user', content: prompt }],
})) {
  streamed += part.message.content;
}

const openai = new OpenAI({ baseURL: `${url}/v1`, apiKey: 'unused', maxRetries: 0, timeout: 1800 * 1000 });
const messages = [{ role: 'user', content: prompt }];
const object = await openai.chat.completions.create({
  model, messages, max_tokens: 300, response_format: { type: 'json_object' },
});
const strict = await openai.chat.completions.create({
  model, messages, max_tokens: 300, temperature: 0.7,
  response_format: { type: 'json_schema', json_schema: { name: 'evaluation', schema, strict: true } },
});
let refusal = null;
try {
  await openai.chat.completions.create({
    model, messages, response_format: {
      type: 'json_schema', json_schema: { name: 'x', schema: { type: 'integer', minimum: 1 } },
    },
  });
} catch (error) {
  refusal = { status: error.status, param: error.param ?? error.error?.param, message: error.message };
}

console.log(JSON.stringify({
  ollama_json: { text: asJson.response, done_reason: asJson.done_reason },
  ollama_schema: { text: withSchema.message.content, done_reason: withSchema.done_reason },
  ollama_stream: { text: streamed },
  openai_object: { text: object.choices[0].message.content, finish_reason: object.choices[0].finish_reason },
  openai_strict: { text: strict.choices[0].message.content, finish_reason: strict.choices[0].finish_reason },
  refusal,
}));
