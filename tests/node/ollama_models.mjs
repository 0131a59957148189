// The official Ollama JavaScript client managing models on the engine: pull with progress (from the
// hub stand-in the test points the engine at), create, copy, list and delete.
// Usage: AI_ENGINE_URL=... PULL_MODEL=hf.co/ORG/REPO:QUANT node ollama_models.mjs
import { Ollama } from 'ollama';

const ollama = new Ollama({ host: process.env.AI_ENGINE_URL });
const pulled = process.env.PULL_MODEL;

const progress = [];
for await (const part of await ollama.pull({ model: pulled, stream: true })) {
  progress.push(part);
}
const created = await ollama.create({ model: 'sofia-node', from: pulled, system: 'Eres Sofía.',
  parameters: { temperature: 0.3, stop: ['Estudiante:'] } });
const copied = await ollama.copy({ source: 'sofia-node', destination: 'sofia-node-2' });
const names = (await ollama.list()).models.map((m) => m.name);
const reply = await ollama.generate({ model: 'sofia-node-2', prompt: 'hola', options: { num_predict: 3 } });
const deleted = await ollama.delete({ model: 'sofia-node' });
const after = (await ollama.list()).models.map((m) => m.name).filter((n) => n.startsWith('sofia-node'));
let missing = null;
let missingError = '';
try {
  await ollama.delete({ model: 'sofia-node' });
} catch (err) {
  missing = err.status_code;
  missingError = err.error;
}
console.log(JSON.stringify({
  statuses: progress.map((p) => p.status), last: progress.at(-1), totals: progress.filter((p) => p.digest),
  created: created.status, copied: copied.status, deleted: deleted.status, names, after,
  reply_count: reply.eval_count, missing, missing_error: missingError,
}));
