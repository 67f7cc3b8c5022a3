-- wrk script for MCP tools/call and tools/list load.
-- Every request carries a unique JSON-RPC id; a response counts as OK only when it is HTTP 200
-- and a JSON-RPC result (not an error, not an isError tool result) for that same id.
-- Configuration comes from environment variables so one script serves every workload:
--   MCP_METHOD (tools/call | tools/list), MCP_TOOL, MCP_ARGS (JSON object text),
--   MCP_TOKEN (bearer token, optional), MCP_SESSION (session id, optional),
--   MCP_PROTOCOL (protocol version header), MCP_EXTRA_HEADERS ("Name: value|Name2: value"),
--   MCP_META (JSON object text sent as params._meta, e.g. the protocol version and client
--   capabilities that 2026-07-28 requests carry; optional),
--   MCP_THREAD_RATE (optional: requests per second this wrk thread offers, with exponential gaps
--   on a clock schedule, so the offered load does not depend on the answers' latency; the
--   connections only bound how many are in flight. Without it: a closed loop at full speed).
-- done() prints one line `WRK_JSON {...}` with counts, percentiles and a latency CDF (microseconds).

local threads = {}
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
  table.insert(threads, thread)
end

function init(args)
  ok = 0
  bad = 0
  seq = 0
  method = os.getenv("MCP_METHOD") or "tools/call"
  tool = os.getenv("MCP_TOOL") or "echo"
  margs = os.getenv("MCP_ARGS") or "{}"
  local meta_json = os.getenv("MCP_META")
  meta = ""
  if meta_json and meta_json ~= "" then meta = ',"_meta":' .. meta_json end
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Accept"] = "application/json, text/event-stream"
  wrk.headers["Mcp-Method"] = method
  if method == "tools/call" then wrk.headers["Mcp-Name"] = tool end
  local proto = os.getenv("MCP_PROTOCOL")
  if proto and proto ~= "" then wrk.headers["MCP-Protocol-Version"] = proto end
  local token = os.getenv("MCP_TOKEN")
  if token and token ~= "" then wrk.headers["Authorization"] = "Bearer " .. token end
  local session = os.getenv("MCP_SESSION")
  if session and session ~= "" then wrk.headers["Mcp-Session-Id"] = session end
  local extra = os.getenv("MCP_EXTRA_HEADERS")
  if extra and extra ~= "" then
    for pair in string.gmatch(extra, "[^|]+") do
      local k, v = string.match(pair, "^%s*([^:]+):%s*(.*)$")
      if k then wrk.headers[k] = v end
    end
  end
  prefix = "t" .. tid .. "-"
  math.randomseed(tid * 7919 + os.time())
  pending = {}
end

function request()
  seq = seq + 1
  local id = prefix .. seq
  pending[id] = true
  local body
  if method == "tools/call" then
    body = '{"jsonrpc":"2.0","id":"' .. id .. '","method":"tools/call","params":{"name":"' .. tool ..
           '","arguments":' .. margs .. meta .. '}}'
  else
    body = '{"jsonrpc":"2.0","id":"' .. id .. '","method":"' .. method .. '","params":{' ..
           string.sub(meta, 2) .. '}}'
  end
  return wrk.format(nil, nil, nil, body)
end

local thread_rate = tonumber(os.getenv("MCP_THREAD_RATE") or "")
if thread_rate and thread_rate > 0 then
  local ffi = require("ffi")
  ffi.cdef[[
    typedef struct { long tv_sec; long tv_nsec; } mcp_timespec;
    int clock_gettime(int clk_id, mcp_timespec *tp);
  ]]
  local ts = ffi.new("mcp_timespec")
  local function now_ms()
    ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
    return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
  end
  local gap_ms = 1000 / thread_rate
  local next_ms = nil
  -- wrk only paces when a global `delay` function exists, so define it only when asked. Each
  -- call books the next slot of this thread's schedule and waits until it comes.
  function delay()
    local now = now_ms()
    if next_ms == nil or next_ms < now - 1000 then
      next_ms = now  -- start, or fell more than a second behind: do not burst to catch up
    end
    next_ms = next_ms + -math.log(1 - math.random()) * gap_ms
    local wait = next_ms - now
    if wait <= 0 then return 0 end
    return math.floor(wait + 0.5)
  end
end

function response(status, headers, body)
  -- A thread's connections interleave, so match the answer's id against this thread's
  -- outstanding ids: each must come back exactly once.
  local id = string.match(body, '"id"%s*:%s*"(t%d+%-%d+)"')
  local known = id and pending[id]
  if id then pending[id] = nil end
  if status == 200 and known and string.find(body, '"result"%s*:')
     and not string.find(body, '"isError"%s*:%s*true')
     and not string.find(body, '"error"%s*:%s*{%s*"code"') then
    ok = ok + 1
  else
    bad = bad + 1
    if bad <= 3 then io.stderr:write("bad response " .. status .. ": " .. string.sub(body, 1, 300) .. "\n") end
  end
end

function done(summary, latency, requests)
  local total_ok, total_bad = 0, 0
  for _, t in ipairs(threads) do
    total_ok = total_ok + (t:get("ok") or 0)
    total_bad = total_bad + (t:get("bad") or 0)
  end
  local p = {}
  for _, q in ipairs({50, 90, 99, 99.9}) do p[tostring(q)] = latency:percentile(q) end
  -- wrk's percentile(100) answers 0, so the ends of the CDF come from min and max.
  local cdf = {string.format("[0,%d]", latency.min)}
  for _, q in ipairs({1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 97.5, 99, 99.5, 99.9, 99.99}) do
    table.insert(cdf, string.format("[%g,%d]", q, latency:percentile(q)))
  end
  table.insert(cdf, string.format("[100,%d]", latency.max))
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"ok":%d,"bad":%d,"errors_connect":%d,"errors_read":%d,' ..
    '"errors_write":%d,"errors_status":%d,"errors_timeout":%d,"lat_mean_us":%.1f,"lat_max_us":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"cdf":[%s]}\n',
    summary.requests, summary.duration, total_ok, total_bad, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.status, summary.errors.timeout,
    latency.mean, latency.max, p["50"], p["90"], p["99"], p["99.9"], table.concat(cdf, ",")))
end
