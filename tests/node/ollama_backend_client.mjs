// A client written like the simulator's later backend, which talks to Ollama: it lists models
// with GET /api/tags, then POSTs /api/generate with stream: false and reads `response` and
// `eval_count`. Usage: AI_ENGINE_URL=... node ollama_backend_client.mjs PROMPT_FILE
import { readFile } from 'node:fs/promises';

const OLLAMA_URL = process.env.AI_ENGINE_URL ?? 'http://localhost:11434';

const tags = await (await fetch(`${OLLAMA_URL}/api/tags`)).json();
const model = process.env.OLLAMA_MODEL ?? tags.models[0].name;

const prompt = await readFile(process.argv[2], 'utf8');
const response = await fetch(`${OLLAMA_URL}/api/generate`, {
  method: 'POST',
  headers: { 'Content-Type': 'application/json' },
  body: JSON.stringify({
    model,
    prompt,
    stream: false,
    options: { temperature: 0.7, num_predict: 150, top_p: 0.9, stop: ['\nTerapeuta:', '\nEstudiante:', '\n\n'] },
  }),
});
if (!response.ok) {
  throw new Error(`engine answered ${response.status}: ${await response.text()}`);
}
const data = await response.json();
console.log(JSON.stringify({
  model, response: data.response.trim(), eval_count: data.eval_count, total_duration: data.total_duration,
  models: tags.models.map((m) => m.name),
}));
