// The Vercel AI SDK's default OpenAI provider (the Responses API) against the gateway: generateText, streamText
// and a tool call. Prints one JSON line with what it got; the test checks it and the gateway's books.
import { generateText, streamText, tool, jsonSchema } from "ai";
import { createOpenAI } from "@ai-sdk/openai";

const openai = createOpenAI({ baseURL: process.env.BASE_URL, apiKey: process.env.API_KEY });
const model = openai(process.env.MODEL);
const out = {};

const plain = await generateText({ model, prompt: "Say hello [usage=20,5]", maxRetries: 0 });
out.generate = { text: plain.text, input: plain.usage.inputTokens, output: plain.usage.outputTokens };

const streamed = streamText({ model, prompt: "Say hello again [usage=30,6]", maxRetries: 0,
                              onError: ({ error }) => { out.streamError = String(error); } });
let text = "";
for await (const delta of streamed.textStream) text += delta;
const usage = await streamed.usage;
out.stream = { text, input: usage.inputTokens, output: usage.outputTokens };

if (process.env.TOOLS) {
  const weather = tool({ description: "The weather in a city",
                         inputSchema: jsonSchema({ type: "object", properties: { city: { type: "string" } } }) });
  const called = await generateText({ model, prompt: "Weather in Paris? [tool=weather][usage=40,10]",
                                      tools: { weather }, maxRetries: 0 });
  out.tool = called.toolCalls.map((c) => ({ name: c.toolName, input: c.input }));
}
console.log(JSON.stringify(out));
