-- wrk script of `loadtests.native`: one streamed Chat Completions request per request sent,
-- counting the answers that are not 200 or do not end the stream with `data: [DONE]`.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"fake/short","messages":[{"role":"user","content":"benchmark"}],"stream":true}'

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   incomplete = 0 -- a global: `done` reads it through `thread:get`, which sees no locals
end

function response(status, headers, body)
   if status ~= 200 or not string.find(body, "data: [DONE]", 1, true) then
      incomplete = incomplete + 1
   end
end

function done(summary, latency, requests)
   local bad = 0
   for _, thread in ipairs(threads) do
      bad = bad + thread:get("incomplete")
   end
   local e = summary.errors
   io.write(string.format("answers: %d\n", summary.requests))
   io.write(string.format("incomplete answers: %d\n", bad))
   io.write(string.format("socket errors: %d\n", e.connect + e.read + e.write + e.timeout))
end
