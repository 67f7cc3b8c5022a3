-- The aggregate endpoint's byte work on calls ext_authz routed to one server (docs/aggregate.md).
-- Rendered into the bootstrap by `mcp-gateway config render` (header names come from
-- gateway.wire); it runs only on the "<server>_aggregate_*" routes.
--
-- Request: ext_authz parsed the body, resolved "files__read_file" and checked that putting the
-- JSON text x-mcp-rw-to in place of x-mcp-rw-len bytes at byte x-mcp-rw-at gives the message it
-- authorized with only that value changed. This splices exactly that (setBytes fixes
-- Content-Length) and keeps the server and the client's request id for the response and for the
-- "server unavailable" local reply.
-- Response: an SSE answer may carry server-to-client requests (elicitation, sampling, roots);
-- their ids get the server's prefix ("files__n:3", "files__s:abc") so the client's answer can be
-- routed back. Events are rewritten whole: a partial event is held until its blank line. JSON
-- answers carry no server requests and are left alone.

local ROUTE = "${route_header}"
local AT, LEN, TO = "${rewrite_at_header}", "${rewrite_len_header}", "${rewrite_to_header}"
local ID_JSON = "${id_json_header}"
local NS = "${metadata_namespace}"

function envoy_on_request(handle)
  local headers = handle:headers()
  local server = headers:get(ROUTE)
  if server == nil then return end
  local id = headers:get(ID_JSON) or "null"
  local at = headers:get(AT)
  if at ~= nil then
    local offset, length, to = tonumber(at), tonumber(headers:get(LEN)), headers:get(TO)
    local body = handle:body()
    local size = body:length()
    if offset == nil or length == nil or to == nil or offset < 0 or offset + length > size then
      -- ext_authz's instruction does not fit this body: never forward a body it did not check.
      handle:respond({[":status"] = "400", ["content-type"] = "application/json"},
        '{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"request body changed after its check"}}')
      return
    end
    local bytes = body:getBytes(0, size)
    body:setBytes(string.sub(bytes, 1, offset) .. to .. string.sub(bytes, offset + length + 1))
    -- body() may have yielded: headers fetched before it are out of scope now.
    headers = handle:headers()
  end
  headers:remove(AT)
  headers:remove(LEN)
  headers:remove(TO)
  headers:remove(ID_JSON)
  local meta = handle:streamInfo():dynamicMetadata()
  meta:set(NS, "server", server)
  meta:set(NS, "id", id)
end

-- The end of a JSON string starting at s[i] == '"'; nil when it does not end in s.
local function string_end(s, i)
  local j = i + 1
  local n = #s
  while j <= n do
    local c = string.byte(s, j)
    if c == 92 then j = j + 2          -- backslash: skip the escaped character
    elseif c == 34 then return j       -- closing quote
    else j = j + 1 end
  end
  return nil
end

local function skip_space(s, i)
  local _, e = string.find(s, "^[ \t\r\n]*", i)
  return e + 1
end

-- The end of the JSON value starting at s[i]; nil when malformed or cut.
local function value_end(s, i)
  local c = string.sub(s, i, i)
  if c == '"' then return string_end(s, i) end
  if c == "{" or c == "[" then
    local depth, j, n = 0, i, #s
    while j <= n do
      local b = string.sub(s, j, j)
      if b == '"' then
        j = string_end(s, j)
        if j == nil then return nil end
      elseif b == "{" or b == "[" then depth = depth + 1
      elseif b == "}" or b == "]" then
        depth = depth - 1
        if depth == 0 then return j end
      end
      j = j + 1
    end
    return nil
  end
  local _, e = string.find(s, "^[%w%.%+%-]+", i)   -- number, true, false, null
  return e
end

-- The span of the top-level "id" value of a JSON object that has a top-level "method" (a
-- request or notification), or nil. Keys inside nested values (tool output) are skipped whole.
local function request_id_span(s)
  local i = skip_space(s, 1)
  if string.sub(s, i, i) ~= "{" then return nil end
  i = skip_space(s, i + 1)
  local has_method, id_from, id_to = false, nil, nil
  while i <= #s do
    if string.sub(s, i, i) ~= '"' then return nil end
    local key_end = string_end(s, i)
    if key_end == nil then return nil end
    local key = string.sub(s, i + 1, key_end - 1)
    i = skip_space(s, key_end + 1)
    if string.sub(s, i, i) ~= ":" then return nil end
    i = skip_space(s, i + 1)
    local e = value_end(s, i)
    if e == nil then return nil end
    if key == "method" then has_method = true
    elseif key == "id" then id_from, id_to = i, e end
    i = skip_space(s, e + 1)
    local sep = string.sub(s, i, i)
    if sep == "}" then break end
    if sep ~= "," then return nil end
    i = skip_space(s, i + 1)
  end
  if has_method and id_from ~= nil then return id_from, id_to end
  return nil
end

-- One SSE event (without its terminating blank line) with a server request's id prefixed.
local function rewrite_event(event, prefix)
  if string.find(event, '"method"', 1, true) == nil then return event end
  local out, changed = {}, false
  for line in string.gmatch(event .. "\n", "([^\n]*)\n") do
    local head, json = string.match(line, "^(data: ?)(.*)")
    if json ~= nil then
      local from, to = request_id_span(json)
      if from ~= nil then
        local id = string.sub(json, from, to)
        local new
        if string.sub(id, 1, 1) == '"' then
          new = '"' .. prefix .. "s:" .. string.sub(id, 2)
        elseif string.match(id, "^%-?%d+") == id then
          new = '"' .. prefix .. "n:" .. id .. '"'
        end
        if new ~= nil then
          line = head .. string.sub(json, 1, from - 1) .. new .. string.sub(json, to + 1)
          changed = true
        end
      end
    end
    out[#out + 1] = line
  end
  if not changed then return event end
  return table.concat(out, "\n")
end

function envoy_on_response(handle)
  local meta = handle:streamInfo():dynamicMetadata():get(NS)
  if meta == nil or meta["server"] == nil then return end
  local kind = handle:headers():get("content-type") or ""
  if string.find(kind, "text/event-stream", 1, true) == nil then return end
  local prefix = meta["server"] .. "__"
  local pending = ""
  for chunk in handle:bodyChunks() do
    local text = pending .. chunk:getBytes(0, chunk:length())
    -- Everything up to the last blank line is whole events; the rest waits for the next chunk.
    local last = nil
    local from = 1
    while true do
      local s, e = string.find(text, "\r?\n\r?\n", from)
      if s == nil then break end
      last = e
      from = e + 1
    end
    local out = {}
    if last ~= nil then
      local whole = string.sub(text, 1, last)
      pending = string.sub(text, last + 1)
      local pos = 1
      while pos <= #whole do
        local s, e = string.find(whole, "\r?\n\r?\n", pos)
        out[#out + 1] = rewrite_event(string.sub(whole, pos, s - 1), prefix)
        out[#out + 1] = string.sub(whole, s, e)
        pos = e + 1
      end
    else
      pending = text
    end
    -- An event still open when the stream ends is dropped, as an SSE client drops it.
    chunk:setBytes(table.concat(out))
  end
end
