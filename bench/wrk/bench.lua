-- wrk script for bench/http.py: GETs with a bearer token, or POST logins, and a done()
-- that prints one line "WRK_JSON {...}" with throughput, latency percentiles and errors.
--
--   wrk ... -s bench.lua http://HOST:PORT/v1/me -- me TOKEN
--   wrk ... -s bench.lua http://HOST:PORT/v1/login -- login echo|form EMAIL_FORMAT PASSWORD PER_THREAD THREADS
--
-- Logins: wrk thread i (0-based) logs in as the users string.format(EMAIL_FORMAT, n) for
-- n = i, i + T, i + 2T, ... (PER_THREAD of them, in turn; T = THREADS, wrk's -t). With one
-- connection per thread no two requests of one account are ever in flight together, so
-- a login never meets the brute-force throttle's per-account limit. "echo" sends JSON
-- {email, password}; "form" sends FastAPI-Users' OAuth2 form (username, password).

local threads = {}
local created = 0

function setup(thread)
   thread:set("id", created)
   created = created + 1
   table.insert(threads, thread)
end

local function urlencode(s)
   return (string.gsub(s, "[^%w%-%._~]", function(c)
      return string.format("%%%02X", string.byte(c))
   end))
end

local requests = {}
local next_request = 0
statuses = {}

function init(args)
   local mode = args[1]
   if mode == "me" then
      requests[1] = wrk.format("GET", nil, { ["Authorization"] = "Bearer " .. args[2] })
   elseif mode == "login" then
      local style, pattern, password = args[2], args[3], args[4]
      local per_thread, nthreads = tonumber(args[5]), tonumber(args[6])
      for k = 0, per_thread - 1 do
         local email = string.format(pattern, id + k * nthreads)
         local body, ctype
         if style == "echo" then
            body = string.format('{"email":"%s","password":"%s"}', email, password)
            ctype = "application/json"
         else
            body = "username=" .. urlencode(email) .. "&password=" .. urlencode(password)
            ctype = "application/x-www-form-urlencoded"
         end
         table.insert(requests, wrk.format("POST", nil, { ["Content-Type"] = ctype }, body))
      end
   else
      error("bench.lua: the first argument must be 'me' or 'login'")
   end
end

function request()
   next_request = next_request % #requests + 1
   return requests[next_request]
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests_done)
   local codes = {}
   local non2xx = 0
   for _, thread in ipairs(threads) do
      local counts = thread:get("statuses")
      for code, n in pairs(counts) do
         codes[code] = (codes[code] or 0) + n
         if code < 200 or code > 299 then
            non2xx = non2xx + n
         end
      end
   end
   local parts = {}
   for code, n in pairs(codes) do
      table.insert(parts, string.format('"%d":%d', code, n))
   end
   local e = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"rps":%.3f,' ..
      '"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d,"stdev_us":%.1f,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"non2xx":%d,"statuses":{%s}}\n',
      summary.requests, summary.duration, summary.bytes,
      summary.requests / (summary.duration / 1e6),
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.mean, latency.max, latency.stdev,
      e.connect, e.read, e.write, e.status, e.timeout,
      non2xx, table.concat(parts, ",")))
end
