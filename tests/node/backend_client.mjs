// A client written like the simulator's Node backend: it builds the interview prompt, POSTs it
// to {AI_ENGINE_URL}/generate with fetch and reads `.texto`. Usage: node backend_client.mjs CASES_JSON CASE_ID
import { readFile } from 'node:fs/promises';

const AI_ENGINE_URL = process.env.AI_ENGINE_URL ?? 'http://localhost:5000';

function buildPrompt(c) {
  const turns = c.turnos.map(([role, text]) => `${role}: ${text}`).join('\n');
  return `${c.contexto_sistema}

CASO CLÍNICO:
Nombre: ${c.nombre}
Edad: ${c.edad}
Ocupación: ${c.ocupacion}

Motivo de consulta: ${c.motivo_consulta}

Historia: ${c.historia}

Estado emocional: ${c.estado_emocional}

Personalidad: ${c.personalidad}

ENTREVISTA:
${turns}
Paciente:`;
}

async function generatePatientResponse(prompt) {
  const response = await fetch(`${AI_ENGINE_URL}/generate`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ prompt, max_length: 150, temperature: 0.7 }),
  });
  if (!response.ok) {
    throw new Error(`AI engine answered ${response.status}: ${await response.text()}`);
  }
  const data = await response.json();
  return data.texto;
}

const [casesPath, caseId] = process.argv.slice(2);
const { cases } = JSON.parse(await readFile(casesPath, 'utf8'));
const c = cases.find((x) => x.id === caseId);
const prompt = buildPrompt(c);
const texto = await generatePatientResponse(prompt);
console.log(JSON.stringify({ texto, prompt }));
