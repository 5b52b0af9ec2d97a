// The official openai npm package's Responses API against a running inferq: one response, one streamed
// response. Prints one JSON line with what it saw; the Python test checks it. Reads INFERQ_BASE_URL,
// INFERQ_KEY, INFERQ_MODEL.
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: process.env.INFERQ_BASE_URL,
  apiKey: process.env.INFERQ_KEY,
  maxRetries: 0,
  timeout: 120_000,
});
const model = process.env.INFERQ_MODEL ?? "smollm2-135m";
const request = { model, input: "Say hello.", max_output_tokens: 16 };

// The text of a Response object's output, read from its message items (the stream's terminal events carry
// the Response as the server sent it, without the SDK's `output_text` convenience).
const textOf = (response) =>
  (response?.output ?? [])
    .filter((item) => item.type === "message")
    .flatMap((item) => item.content ?? [])
    .filter((part) => part.type === "output_text")
    .map((part) => part.text)
    .join("");

const done = await client.responses.create(request);

const events = [];
const sequenceNumbers = [];
let deltas = "";
let doneText = null;
let createdId = null;
let final = null;
const stream = await client.responses.create({ ...request, stream: true });
for await (const event of stream) {
  events.push(event.type);
  sequenceNumbers.push(event.sequence_number);
  if (event.type === "response.created") createdId = event.response.id;
  if (event.type === "response.output_text.delta") deltas += event.delta;
  if (event.type === "response.output_text.done") doneText = event.text;
  if (event.type === "response.completed" || event.type === "response.incomplete") final = event.response;
}

console.log(
  JSON.stringify({
    id: done.id ?? null,
    object: done.object ?? null,
    status: done.status ?? null,
    incompleteDetails: done.incomplete_details ?? null,
    outputText: done.output_text,
    outputTypes: (done.output ?? []).map((item) => item.type),
    usage: done.usage ?? null,
    stream: {
      events,
      sequenceNumbers,
      deltas,
      doneText,
      createdId,
      finalId: final?.id ?? null,
      finalObject: final?.object ?? null,
      finalStatus: final?.status ?? null,
      finalText: final ? textOf(final) : null,
      finalUsage: final?.usage ?? null,
    },
  }),
);
