// The Vercel AI SDK (`ai` with `@ai-sdk/openai`, whose default model calls POST /v1/responses) against a
// running inferq: generateText, streamText, and a forced tool call with each. Prints one JSON line with what it
// saw; the Python test checks it. Reads INFERQ_BASE_URL, INFERQ_KEY, INFERQ_MODEL.
import { createOpenAI } from "@ai-sdk/openai";
import { generateText, streamText, tool } from "ai";
import { z } from "zod";

const openai = createOpenAI({ baseURL: process.env.INFERQ_BASE_URL, apiKey: process.env.INFERQ_KEY });
const model = openai(process.env.INFERQ_MODEL ?? "smollm2-135m");
const common = { model, maxRetries: 0, timeout: 120_000 };
const prompt = "Write one sentence about the sea.";

// streamText reports failures as stream parts and to onError rather than by throwing; fail loudly instead.
const streamErrors = [];
const onError = ({ error }) => streamErrors.push(error);
const failOnStreamErrors = (what) => {
  if (streamErrors.length) {
    console.error(`${what}:`, ...streamErrors);
    throw new Error(`${what} failed: ${streamErrors.map((e) => e?.message ?? String(e)).join("; ")}`);
  }
};

const usageOf = (usage) => ({
  inputTokens: usage.inputTokens ?? null,
  outputTokens: usage.outputTokens ?? null,
  totalTokens: usage.totalTokens ?? null,
});
const callOf = (call) => ({
  toolCallId: call.toolCallId,
  toolName: call.toolName,
  input: call.input,
  invalid: call.invalid ?? false,
  error: call.error ? String(call.error) : null,
});

const generated = await generateText({ ...common, prompt, maxOutputTokens: 16 });

const streamed = streamText({ ...common, prompt, maxOutputTokens: 16, onError });
let streamedText = "";
for await (const text of streamed.textStream) streamedText += text;
failOnStreamErrors("streamText");

const tools = {
  get_weather: tool({
    description: "Get the current weather in a city.",
    inputSchema: z.object({ city: z.string() }),
  }),
};
const toolRequest = {
  ...common,
  prompt: "What is the weather in Oslo?",
  tools,
  toolChoice: { type: "tool", toolName: "get_weather" },
};

const called = await generateText(toolRequest);

const streamedCall = streamText({ ...toolRequest, onError });
const partTypes = [];
const streamedCalls = [];
for await (const part of streamedCall.fullStream) {
  if (partTypes.at(-1) !== part.type) partTypes.push(part.type);
  if (part.type === "tool-call") streamedCalls.push(callOf(part));
}
failOnStreamErrors("streamText with a tool");

console.log(
  JSON.stringify({
    generate: {
      text: generated.text,
      finishReason: generated.finishReason,
      rawFinishReason: generated.rawFinishReason ?? null,
      usage: usageOf(generated.usage),
      responseId: generated.response.id,
      warnings: generated.warnings ?? [],
    },
    stream: {
      text: streamedText,
      finishReason: await streamed.finishReason,
      usage: usageOf(await streamed.usage),
    },
    tool: {
      toolCalls: called.toolCalls.map(callOf),
      finishReason: called.finishReason,
      warnings: called.warnings ?? [],
    },
    streamTool: {
      toolCalls: streamedCalls,
      finishReason: await streamedCall.finishReason,
      partTypes,
    },
  }),
);
