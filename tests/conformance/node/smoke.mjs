// The official openai npm package against a running inferq: one chat, one streamed chat, one named tool
// call. Prints one JSON line with what it saw; the Python test checks it. Reads INFERQ_BASE_URL, INFERQ_KEY.
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: process.env.INFERQ_BASE_URL,
  apiKey: process.env.INFERQ_KEY,
  maxRetries: 0,
  timeout: 120_000,
});
const model = process.env.INFERQ_MODEL ?? "smollm2-135m";
const messages = [{ role: "user", content: "Write one sentence about the sea." }];

const done = await client.chat.completions.create({ model, messages, max_tokens: 16 });

let streamed = "";
let chunks = 0;
let finish = null;
const stream = await client.chat.completions.create({ model, messages, max_tokens: 16, stream: true });
for await (const chunk of stream) {
  chunks += 1;
  streamed += chunk.choices[0]?.delta?.content ?? "";
  finish = chunk.choices[0]?.finish_reason ?? finish;
}

const parameters = {
  type: "object",
  properties: { city: { type: "string" } },
  required: ["city"],
};
const called = await client.chat.completions.create({
  model,
  messages: [{ role: "user", content: "What is the weather in Oslo?" }],
  tools: [{ type: "function", function: { name: "get_weather", parameters } }],
  tool_choice: { type: "function", function: { name: "get_weather" } },
});

let unauthorized = null;
try {
  await new OpenAI({ baseURL: process.env.INFERQ_BASE_URL, apiKey: "wrong", maxRetries: 0 }).models.list();
} catch (err) {
  unauthorized = { status: err.status, code: err.code };
}

console.log(
  JSON.stringify({
    object: done.object,
    content: done.choices[0].message.content,
    usage: done.usage,
    streamed,
    chunks,
    finish,
    toolCall: called.choices[0].message.tool_calls?.[0] ?? null,
    toolFinish: called.choices[0].finish_reason,
    unauthorized,
  }),
);
