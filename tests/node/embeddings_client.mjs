// Embeddings through the official JavaScript clients: ollama's embed() (/api/embed) and openai's
// embeddings.create() (/v1/embeddings), once as the client sends it by default (it asks for base64
// and decodes it) and once with encoding_format 'float'. Prints the vectors as JSON.
// Usage: AI_ENGINE_URL=... OLLAMA_MODEL=... OPENAI_MODEL=... node embeddings_client.mjs TEXT...
import { Ollama } from 'ollama';
import OpenAI from 'openai';

const url = process.env.AI_ENGINE_URL;
const texts = process.argv.slice(2);

const ollama = new Ollama({ host: url });
const embed = await ollama.embed({ model: process.env.OLLAMA_MODEL, input: texts });

const openai = new OpenAI({ baseURL: `${url}/v1`, apiKey: 'not-needed' });
const byDefault = await openai.embeddings.create({ model: process.env.OPENAI_MODEL, input: texts });
const asFloat = await openai.embeddings.create({ model: process.env.OPENAI_MODEL, input: texts, encoding_format: 'float' });

console.log(JSON.stringify({
  ollama: { model: embed.model, embeddings: embed.embeddings, prompt_eval_count: embed.prompt_eval_count },
  openai_default: { data: byDefault.data.map((d) => ({ index: d.index, embedding: Array.from(d.embedding) })), usage: byDefault.usage },
  openai_float: { data: asFloat.data.map((d) => ({ index: d.index, embedding: d.embedding })) },
}));
